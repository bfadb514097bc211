"""Generate hansgate/service/grafana/hansgate-fairness-dashboard.json with Grafana's typed builder.

    python scripts/fairness_dashboard.py            # rewrite the shipped JSON
    python scripts/fairness_dashboard.py --check    # exit 1 when the shipped JSON is stale

grafana-foundation-sdk (Grafana Labs) is a dev dependency: the generated JSON ships, so the
gateway never needs it. tests/service/test_fairness_dashboard.py checks every panel's query
with promtool and that it names only exported or recorded series.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders.common import VizLegendOptions
from grafana_foundation_sdk.builders.dashboard import Dashboard, DatasourceVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import LegendDisplayMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUT = Path(__file__).resolve().parents[1] / "hansgate" / "service" / "grafana" / "hansgate-fairness-dashboard.json"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")

#: (row, title, unit, [(expr, legend)], description)
PANELS = [
    ("Before labels: who receives which decision", "Selection rate by subgroup and class (since start)",
     "percentunit", [("hansgate:selection_rate:ratio", "{{attribute}}={{value}} class {{class}}")],
     "Share of a subgroup's predictions that went to each class (demographic parity)."),
    ("Before labels: who receives which decision", "Disparate-impact ratio (1 h) vs the four-fifths bound",
     "percentunit", [("hansgate:disparate_impact:ratio_rate1h", "{{attribute}} class {{class}}"),
                     ('max(hansgate_alert_threshold{name="disparate_impact_ratio"})', "bound")],
     "Lowest over highest subgroup selection rate per attribute and class; the alert fires below the bound."),
    ("Before labels: who receives which decision", "Rows per subgroup (1 h, alert guard)", "short",
     [("hansgate:subgroup_rows:increase1h", "{{attribute}}={{value}}"),
      ('max(hansgate_alert_threshold{name="min_samples"})', "guard")],
     "No fairness alert is raised while any subgroup of the attribute has fewer rows than the guard."),
    ("Label-free recall (calibrated)", "Estimated vs realized recall by subgroup and class",
     "percentunit", [("hansgate:estimated_recall:ratio", "estimated {{attribute}}={{value}} class {{class}}"),
                     ('hansgate:subgroup_recall:ratio{attribute!="_all"}',
                      "realized {{attribute}}={{value}} class {{class}}")],
     "Estimated from calibrated probabilities before any label; realized once feedback arrives."),
    ("Label-free recall (calibrated)", "Watched concept present, share of a subgroup's rows", "percentunit",
     [("hansgate:subgroup_concept_presence:ratio", "{{attribute}}={{value}} {{concept}}")],
     "Where a known shortcut is present, calibration fitted without it cannot be trusted."),
    ("After labels: equalized odds", "True-positive-rate gap across subgroups", "percentunit",
     [("hansgate:equalized_odds_tpr_gap:max", "{{attribute}} class {{class}}"),
      ('max(hansgate_alert_threshold{name="equalized_odds_gap"})', "bound")],
     "Largest minus smallest subgroup recall per attribute and class."),
    ("After labels: equalized odds", "False-positive-rate gap across subgroups", "percentunit",
     [("hansgate:equalized_odds_fpr_gap:max", "{{attribute}} class {{class}}"),
      ('max(hansgate_alert_threshold{name="equalized_odds_gap"})', "bound")],
     "Largest minus smallest subgroup false-positive rate per attribute and class."),
]


def build() -> dict:
    dashboard = (Dashboard("hansgate — fairness").uid("hansgate-fairness").tags(["hansgate", "fairness"])
                 .refresh("1m").time("now-6h", "now").with_variable(DatasourceVariable("datasource").type("prometheus")))
    row = None
    for row_title, title, unit, queries, description in PANELS:
        if row_title != row:
            dashboard = dashboard.with_row(Row(row_title))
            row = row_title
        panel = (Timeseries().title(title).description(description).unit(unit).datasource(DATASOURCE)
                 .height(8).span(12).legend(VizLegendOptions().display_mode(LegendDisplayMode.TABLE).show_legend(True)))
        for ref, (expr, legend) in zip("ABCDEF", queries):
            panel = panel.with_target(Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE))
        dashboard = dashboard.with_panel(panel)
    return json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare with the shipped JSON")
    args = parser.parse_args(argv)
    text = json.dumps(build(), indent=2, sort_keys=True) + "\n"
    if args.check:
        stale = not OUT.is_file() or OUT.read_text() != text
        print(f"{OUT.name}: {'stale, run scripts/fairness_dashboard.py' if stale else 'up to date'}")
        return int(stale)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
