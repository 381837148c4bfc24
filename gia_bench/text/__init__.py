"""Text: token data sets, language models, text metrics and token attacks (the ``text`` extra).

Importing :mod:`gia_bench.data`, :mod:`gia_bench.models`, :mod:`gia_bench.metrics` and
:mod:`gia_bench.attacks` registers the text entries (``pii``, ``topics``, ``minilm``,
``smollm2``, ``transformer``, ``rouge1`` ..., ``tokens``); nothing here imports
``transformers`` until a text model or tokenizer is built, so the image side runs
without the extra installed. :mod:`gia_bench.text.layout` says how a sentence travels
as a model input and in the truth file.
"""
