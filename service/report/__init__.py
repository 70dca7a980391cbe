"""The HTML report of a recommendation: the page's data (`page`), its plots (`plots`) and the SVG chart
toolkit they are drawn with (`svg`). Input is the API's public view of a job and of its trials; the
report reads no database row.
"""

from service.report.page import Report, build_report, index_row

__all__ = ["Report", "build_report", "index_row"]
