"""The style sheet of report.html, inlined into the page because the page may load nothing."""

__all__ = ['STYLE_SHEET']

STYLE_SHEET = """
:root { --ink: #1d2520; --muted: #5f6b63; --line: #dfe4df; --paper: #ffffff; --page: #f3f5f1;
  --weather: #3b78b8; --ground: #3c8a4c; --bad: #b5452f; --ok: #2e7d43; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--page); color: var(--ink);
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1200px; margin: 0 auto; padding: 28px 24px 40px; }
header h1 { margin: 0 0 4px; font-size: 26px; letter-spacing: -0.01em; }
header .sub { color: var(--muted); }
section { background: var(--paper); border: 1px solid var(--line); border-radius: 10px;
  padding: 18px 22px 20px; margin-top: 18px; }
section h2 { margin: 0 0 12px; font-size: 18px; }
.note { color: var(--muted); font-size: 13px; margin: 4px 0 10px; }
.empty { color: var(--muted); font-style: italic; }
.warn { background: #fbeae5; border: 1px solid #e7b7aa; color: #7a2614; border-radius: 8px;
  padding: 10px 14px; margin-top: 14px; }
.cards { display: grid; grid-template-columns: repeat(5, 1fr); gap: 12px; margin-top: 18px; }
.card { background: var(--paper); border: 1px solid var(--line); border-radius: 10px; padding: 12px 16px; }
.card .value { font-size: 26px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .name { color: var(--muted); font-size: 13px; }
.card.bad .value { color: var(--bad); }
.legend { display: flex; gap: 18px; font-size: 13px; color: var(--muted); margin-bottom: 6px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px;
  vertical-align: -1px; }
svg.chart { display: block; width: 100%; height: auto; max-width: 860px; }
svg.chart text { font: 13px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif; fill: var(--ink); }
svg.chart text.value { fill: var(--muted); font-variant-numeric: tabular-nums; }
svg.chart .track { fill: #eef1ed; }
svg.chart .weather { fill: var(--weather); }
svg.chart .ground { fill: var(--ground); }
.headline { display: flex; align-items: baseline; gap: 14px; flex-wrap: wrap; }
.headline .big { font-size: 40px; font-weight: 700; color: var(--ok); font-variant-numeric: tabular-nums; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { padding: 5px 10px; text-align: right; border-bottom: 1px solid var(--line); }
th { font-size: 13px; color: var(--muted); font-weight: 600; }
th:first-child, td:first-child { text-align: left; }
td.text, th.text { text-align: left; }
tr.unseen td { color: #a2aba4; }
.metric { display: flex; align-items: center; justify-content: flex-end; gap: 8px; }
.metric .track { width: 120px; height: 8px; background: #eef1ed; border-radius: 4px; overflow: hidden; }
.metric .fill { height: 100%; background: var(--ground); }
.eval-row { display: flex; flex-wrap: wrap; gap: 24px 56px; align-items: flex-start; }
.eval-row .f2 { min-width: 260px; }
.eval-row h3 { margin: 0 0 2px; font-size: 15px; }
.headline .big + span { font-size: 13px; color: var(--muted); line-height: 1.3; }
table.confusion td.cell { min-width: 72px; text-align: center; font-weight: 600; }
table.confusion th.corner { text-align: left; font-weight: 400; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 13px; }
table.examples td { vertical-align: top; }
table.examples td.message { max-width: 560px; overflow-wrap: anywhere; color: var(--muted); }
.path { display: block; color: var(--muted); font-size: 12px; overflow-wrap: anywhere; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(118px, 1fr)); gap: 14px 12px; }
figure { margin: 0; }
figure img { display: block; width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 6px;
  background: #dde3dc; }
figure .missing { width: 100%; aspect-ratio: 1; border-radius: 6px; background: repeating-linear-gradient(
  45deg, #e4e8e3, #e4e8e3 8px, #eef1ed 8px, #eef1ed 16px); }
figcaption { margin-top: 5px; font-size: 12px; }
figcaption .name { font-weight: 600; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.tags { display: flex; flex-wrap: wrap; gap: 3px; margin-top: 3px; }
.tag { border-radius: 9px; padding: 0 6px; font-size: 11px; line-height: 17px; color: #fff;
  background: var(--ground); }
.tag.weather { background: var(--weather); }
.tag.none { background: #9aa39c; }
footer { color: var(--muted); font-size: 12px; margin-top: 22px; text-align: center; }
@media (max-width: 900px) { .cards { grid-template-columns: repeat(2, 1fr); } }
"""
