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


def add_flags(parser, cls, presets=None):
    """One flag per field of the dataclass `cls`: bools as --x / --no-x, lists by repeating the flag. A flag not
    given stays out of the parsed namespace, so defaults can come from elsewhere too: with `presets` ({name: {field:
    value}}, train.py's) each flag's help shows the value every preset runs with."""
    for f in dataclasses.fields(cls):
        types = [t for t in typing.get_args(f.type) if t is not type(None)]    # int | None -> int, list[str] -> str
        kind = types[0] if types else f.type
        if kind is bool:
            extra = dict(action=argparse.BooleanOptionalAction)
        elif typing.get_origin(f.type) is list:
            extra = dict(action="append", type=kind)
        else:
            extra = dict(type=kind)
        help = (f.metadata["help"] + _defaults(f, presets or {})).replace("%", "%%")   # argparse formats help with %
        parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=help, **extra)
    return parser


def _defaults(f, presets):
    """The help's tail: " (default: 128)" where every preset leaves the same value (or there are no presets), else
    each preset's value: " (preset gpu: 5000, cpu: 700)"."""
    default = None if f.default is dataclasses.MISSING else f.default
    values = {name: preset.get(f.name, default) for name, preset in presets.items()}     # what each preset runs with
    if len({repr(v) for v in values.values()}) > 1:
        return " (preset " + ", ".join(f"{name}: {value}" for name, value in values.items()) + ")"
    value = next(iter(values.values()), default)
    return "" if value is None else f" (default: {value})"


def parse_config(cls, argv, description):
    """An instance of `cls` from the command line (argv=None: sys.argv)."""
    parser = add_flags(argparse.ArgumentParser(description=description), cls)
    return cls(**vars(parser.parse_args(argv)))
