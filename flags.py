"""Config dataclasses on the command line: one flag per field (`--lr 3e-4` sets `lr`), for train.py, generate.py and
eval.py, so that each script's flags map 1:1 onto its config."""
import argparse
import dataclasses
import typing


def option(default, help):
    """A config field with its --help text. A list default starts empty, and its flag is repeated to add items."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=list, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def add_flags(parser, cls):
    """One flag per field of the dataclass `cls`: bools as --x / --no-x, lists by repeating the flag. A flag not
    given stays out of the parsed namespace, so defaults can come from elsewhere too (train.py's presets)."""
    for f in dataclasses.fields(cls):
        types = [t for t in typing.get_args(f.type) if t is not type(None)]    # int | None -> int, list[str] -> str
        kind = types[0] if types else f.type
        if kind is bool:
            extra = dict(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(f.type) is list:
            extra = dict(action="append", type=kind)
        else:
            extra = dict(type=kind)
        default = "" if f.default in (None, dataclasses.MISSING) else f" (default: {f.default})"
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=f.metadata["help"] + default, **extra)
    return parser


def parse_config(cls, argv, description):
    """An instance of `cls` from the command line (argv=None: sys.argv)."""
    parser = add_flags(argparse.ArgumentParser(description=description), cls)
    return cls(**vars(parser.parse_args(argv)))
