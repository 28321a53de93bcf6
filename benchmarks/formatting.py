"""How RESULTS.md writes numbers, ratios and tables: one place for report.py and its sections."""


def n(value, digits=0) -> str:
  """A number with thousands separators, or n/a."""
  if value is None:
    return 'n/a'
  return f'{value:,.{digits}f}'


def x(value) -> str:
  """A ratio: 0.52x, 12.5x, or n/a."""
  if value is None:
    return 'n/a'
  return f'{value:.2f}x' if value < 10 else f'{value:.1f}x'


def table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A markdown table's lines."""
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(' --- ' for _ in header) + '|']
  lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
  return lines
