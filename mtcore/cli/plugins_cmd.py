"""``mtcore plugins``: what is installed, by whom, and every component by kind."""

from __future__ import annotations

import argparse
import json
from typing import Any

from mtcore.plugin_manager import default_manager
from mtcore.specs import KINDS, plural


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plugins", help="list plugins and the components they provide",
                       description="List every plugin (distribution, version) and every "
                       "component by kind with its provider and summary.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def collect() -> dict[str, Any]:
    """The plugin listing as plain data (what --json prints)."""
    pm = default_manager()
    components = {kind: [] for kind in KINDS}
    for kind in KINDS:
        for p in sorted(pm.provided(kind), key=lambda x: (x.spec.name, x.plugin.name)):
            components[kind].append({
                "name": p.spec.name, "plugin": p.plugin.name, "summary": p.spec.summary,
                "defaults": {k: v for k, v in p.spec.defaults.items()},
            })
    return {
        "plugins": [
            {"name": i.name, "distribution": i.distribution, "version": i.version,
             "module": i.module, "builtin": i.builtin}
            for i in pm.plugins
        ],
        "failed": [{"name": i.name, "distribution": i.distribution, "error": why}
                   for i, why in pm.report.failed],
        "disabled": [{"name": i.name, "distribution": i.distribution} for i in pm.report.disabled],
        "partial": [{"name": i.name, "distribution": i.distribution, "error": why}
                    for i, why in pm.report.partial],
        "components": components,
    }


def run(args: argparse.Namespace) -> int:
    data = collect()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    print("Plugins:")
    for p in data["plugins"]:
        tag = " [built-in]" if p["builtin"] else ""
        print(f"  {p['name']:<12} {p['distribution'] or '-'} {p['version'] or ''}{tag}")
    for p in data["failed"]:
        print(f"  {p['name']:<12} FAILED: {p['error']}")
    for p in data["disabled"]:
        print(f"  {p['name']:<12} disabled")
    for p in data["partial"]:
        print(f"  {p['name']:<12} PARTLY LOADED: {p['error']}")
    for kind, comps in data["components"].items():
        print(f"\n{plural(kind)}:")
        for c in comps:
            print(f"  {c['name']:<20} {c['summary']}  ({c['plugin']})")
    return 0
