"""Label strategies: the batch's labels from the last layer's gradient, or optimised jointly.

Labels are always inferred from what the server observes, never read from the
truth. Select one with ``labels=`` in an attack spec; ``auto`` (the default) is
``idlg`` for one image and ``mean-embedding-eb`` for a batch (``bias-corrected`` where the
head has no bias or there are only 2 classes; :func:`resolve`).

* ``idlg`` (Zhao et al. 2020, sec. 3.1): for B = 1, softmax cross-entropy and
  non-negative features h into the last linear layer, dL/dW_c = (p_c - y_c) h, so
  only the true class's row is non-positive: label = argmin_c sum_j dL/dW_cj.
* ``yin`` (Yin et al. 2021, GradInversion sec. 3.2): the B classes whose weight
  rows have the most negative minimum; assumes B distinct labels.
* ``bias-corrected`` (Geng et al. 2021, "Towards general deep leakage", eq. 8;
  breaching's ``bias-corrected``): with mean-reduced CE, dL/db_c = mean_n p_nc - n_c / B,
  so n_c = B (p̂_c - dL/db_c), with p̂ the model's mean softmax on dummy inputs.
  Without a bias, dL/db_c is estimated as sum_j dL/dW_cj / Ō with Ō the mean
  feature sum on the same dummy inputs. Every class with a negative entry gets at
  least one image; the rest go by largest remaining count. Labels may repeat.
* ``ilrg`` (Ma et al., ICLR 2023, "Instance-wise Batch Label Restoration via
  Gradients in Federated Learning"): class-wise mean embeddings from the last layer,
  ĥ_c = dL/dW_c / dL/db_c, their posteriors p̂_c = softmax(W ĥ_c + b), then the counts k
  from the bias-gradient system  B dL/db_c = sum_j k_j p̂_jc - k_c,  sum_j k_j = B,
  solved by least squares (Moore-Penrose pseudoinverse) and rounded to integers.
* ``llg`` (Wainakh et al. 2022, "User-Level Label Leakage from Gradients in Federated
  Learning", LLG+): per-class sums of the last layer's weight gradient, corrected by an
  offset s_c and divided by the impact m of one instance, both estimated by simulating
  the model (the paper's auxiliary-data estimate, here on N(0, 1) dummy inputs as in the
  authors' dummy-data variant, since the attacker holds no data).
* ``mean-embedding``: ``bias-corrected``'s counts n_c = sum_n p_nc - B dL/db_c with the
  summed posteriors taken at the batch's mean embedding regressed from the last layer's own
  gradient (dL/dW_c ≈ dL/db_c mu, weighted by the counts, iterated), not at dummy inputs'.
* ``mean-embedding-eb``: ``mean-embedding`` with the regressed mean embedding shrunk towards
  the dummies' by an empirical-Bayes weight estimated from the record, and the counts
  rounded in the metric of their errors (a logit error moves class c's count by ~S_c).
  Both take their dummies as Gaussian noise of the spectrum 1/f^e whose mean embedding the
  gradient's regression favours (``spectrum=auto``), not white noise.
* ``joint`` (Zhu et al. 2019): no inference; the attack optimises soft labels.

Every strategy takes the observed gradient per parameter (:class:`LabelContext`), so it
can be fed the naive view (the decoded gradient) or another estimate of the gradient.
For a FedAvg record (K local steps, :mod:`gia_bench.fedavg`) the observed update is the
sum of K gradients; :func:`infer_labels` divides it by K so the strategies see one
average gradient (each example takes part equally often when K * local_batch is a
multiple of the batch; otherwise approximately).
"""

# Importing each family registers its strategies, in this order (``gia-bench list`` shows it).
from gia_bench.attacks.labels.base import (
    LABELS,
    Head,
    LabelContext,
    LabelStrategy,
    counts_to_labels,
    find_head,
    head_inputs,
    register,
    round_counts,
)
from gia_bench.attacks.labels.rows import IDLG, Yin
from gia_bench.attacks.labels.bias import BiasCorrected
from gia_bench.attacks.labels.dummies import SPECTRA, colour, coloured_noise, white_fields
from gia_bench.attacks.labels.ilrg import ILRG
from gia_bench.attacks.labels.llg import LLG
from gia_bench.attacks.labels.mean_embedding import MeanEmbedding, MeanEmbeddingEB, posterior_rounding
from gia_bench.attacks.labels.joint import Joint
from gia_bench.attacks.labels.infer import infer_labels, resolve

__all__ = [
    "BiasCorrected",
    "Head",
    "IDLG",
    "ILRG",
    "Joint",
    "LABELS",
    "LLG",
    "LabelContext",
    "LabelStrategy",
    "MeanEmbedding",
    "MeanEmbeddingEB",
    "SPECTRA",
    "Yin",
    "colour",
    "coloured_noise",
    "counts_to_labels",
    "find_head",
    "head_inputs",
    "infer_labels",
    "posterior_rounding",
    "register",
    "resolve",
    "round_counts",
    "white_fields",
]
