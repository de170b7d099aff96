"""Human-readable outputs: self-contained HTML pages with embedded plots, markdown tables."""

from saeguard.report.html import HtmlPage, figure_data_uri, markdown_table

__all__ = ["HtmlPage", "figure_data_uri", "markdown_table"]
