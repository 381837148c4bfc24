"""Reports: SSIM / PSNR / LPIPS of every reconstruction against the accuracy and bytes of its defense."""

from gia_bench.reports.figures import (
    Figure,
    accuracy_vs_bandwidth,
    frontier,
    image_grid,
    leakage_vs_step,
    privacy_vs_bandwidth,
)
from gia_bench.reports.headline import (
    DefenseRow,
    HeadlineGroup,
    headline,
    study_warnings,
)
from gia_bench.reports.load import (
    AttackResult,
    Budget,
    RunSet,
    Skipped,
    TrainRun,
    load_runs,
    parse_result,
    parse_train,
)
from gia_bench.reports.report import ReportOptions, ReportOutput, make_report
from gia_bench.reports.tables import (
    ReportData,
    Stat,
    SummaryRow,
    TableGroup,
    build_report,
    results_csv,
    summary_csv,
)
from gia_bench.reports.terminal import TerminalTable, terminal_tables, warning_lines
from gia_bench.reports.writers import THREAT_MODEL, html_report, markdown

__all__ = [
    "THREAT_MODEL",
    "AttackResult",
    "Budget",
    "DefenseRow",
    "Figure",
    "HeadlineGroup",
    "ReportData",
    "ReportOptions",
    "ReportOutput",
    "RunSet",
    "Skipped",
    "Stat",
    "SummaryRow",
    "TableGroup",
    "TrainRun",
    "accuracy_vs_bandwidth",
    "build_report",
    "frontier",
    "headline",
    "html_report",
    "image_grid",
    "leakage_vs_step",
    "load_runs",
    "make_report",
    "markdown",
    "parse_result",
    "parse_train",
    "privacy_vs_bandwidth",
    "results_csv",
    "TerminalTable",
    "terminal_tables",
    "study_warnings",
    "summary_csv",
    "warning_lines",
]  # fmt: skip
