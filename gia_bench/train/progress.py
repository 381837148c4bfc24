"""Rank 0's progress: a rich bar on a terminal, one line per epoch everywhere, each naming its defense.

A study trains several defenses, one after another or side by side, and their epoch lines
land in one log: ``powersgd:rank=2 epoch 1/2: loss ...`` says which run a line is about.
"""

from __future__ import annotations

class Progress:
    """Rank 0's rich progress bar (only on a terminal; elsewhere one line per epoch)."""

    def __init__(self, enabled: bool, epochs: int, steps: int, start_epoch: int, defense: str = "") -> None:
        from gia_bench.console import make_console

        self.console = make_console(stderr=True)  # off a terminal: a line is never broken inside the spec
        self.name = f"{defense} " if defense else ""
        self.rank0 = enabled
        self.enabled = enabled and self.console.is_terminal
        self.epochs = epochs
        self.bar = None
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), console=self.console,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=epochs * steps, completed=start_epoch * steps, loss=0.0)

    def step(self, epoch: int, loss: float) -> None:
        if self.bar is not None:
            from rich.markup import escape  # a module:Class spec may hold brackets

            self.bar.update(self.task, advance=1, description=f"{escape(self.name)}epoch {epoch + 1}/{self.epochs}",
                            loss=loss)

    def epoch_done(self, row: dict) -> None:
        if self.rank0:
            self.console.print(
                f"{self.name}epoch {row['epoch']}/{self.epochs}: loss {row['train_loss']:.4f}"
                f"  test acc {100 * row['test_accuracy']:.2f}%  {row['bytes_sent_per_worker']:,} bytes/worker this epoch"
                f"  {row['seconds']:.1f} s",
                highlight=False, markup=False, soft_wrap=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
