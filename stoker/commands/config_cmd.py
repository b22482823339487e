"""`stoker config schema|check`."""

import argparse
import json

from stoker.config import json_schema, load_config


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("config", help="inspect run configs")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")
    verbs.required = True
    schema = verbs.add_parser("schema", help="print the run config's JSON schema")
    schema.set_defaults(handler=_schema)
    check = verbs.add_parser("check", help="validate a run config and print it resolved")
    check.add_argument("config")
    check.set_defaults(handler=_check)


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return 0


def _check(args: argparse.Namespace) -> int:
    run = load_config(args.config)
    print(json.dumps(run.model_dump(mode="json"), indent=2))
    return 0
