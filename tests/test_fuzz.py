"""Generated bad inputs through the loaders (hypothesis), beyond the hand-picked ones of the other tests.

Targets: safetensors files with mutated headers, truncated or bit-flipped data, or well-formed but with the wrong
tensors, through checkpoints.load_mamba2, load_vision and load_pretrained on tiny checkpoints written here;
mutated config.json values and types, and corrupted JSON text, for the three; random LLaVA records (missing keys, wrong
types, huge strings, odd unicode, <image> markers anywhere) and corrupted record files through data.py's loading,
validation, dataset and batching; random and damaged image files through vision.preprocess.

Each case must end in a clean error, a ValueError or FileNotFoundError whose message names the file or the record,
or in a correct load: never another exception from deep inside (TypeError, KeyError, RuntimeError, struct.error,
UnicodeDecodeError, ...), a hang (a case over LIMIT seconds fails) or runaway memory. CI runs a fixed sequence of
EXAMPLES cases per target; `FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz.py` runs 5000 per target, random
ones. The counts (cases, clean errors, loads) are printed at the end of the module.
"""
import contextlib
import copy
import faulthandler
import io
import json
import os
import re
import resource
import signal
import struct
import tempfile
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import data
import checkpoints
import vision
from checkpoints import load_mamba2
from mlmamba import ConnectorConfig, Mamba2Config, Mamba2LM, MLMamba, MLMambaConfig
from tokenizer import load_tokenizer

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))
LIMIT = 30                             # seconds a case may take before it counts as a hang
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=list(HealthCheck))
COUNTS = {}                            # target -> Counter(cases, clean errors, loads)


# ----------------------------------------------------------------------------------------------------------------------
# The harness: a case is a clean error or a load, in bounded time


class Hang(BaseException):
    """A case over LIMIT seconds. Not an Exception, so that no loader's `except Exception` turns it into a clean
    error."""


@contextlib.contextmanager
def time_limit(seconds, what):
    """Hang after `seconds`, raised again every second (one raised inside a garbage-collector callback is lost);
    a hang inside C code ends the process, printing every thread's stack."""
    def expire(signum, frame):
        raise Hang(f"{what}: still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1)
    faulthandler.dump_traceback_later(4 * seconds, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def attempt(target, load, names):
    """load(): its result, or None after a clean error (ValueError or FileNotFoundError naming one of `names`, not a
    decoding error from deep inside); any other exception, or a hang, fails the test."""
    counts = COUNTS.setdefault(target, Counter())
    counts["cases"] += 1
    with time_limit(LIMIT, target):
        try:
            result = load()
        except (ValueError, FileNotFoundError) as e:
            message = str(e)
            if isinstance(e, (UnicodeError, json.JSONDecodeError)) or not any(str(n) in message for n in names):
                raise AssertionError(f"{target}: not a clean error ({type(e).__name__} naming none of "
                                     f"{[str(n) for n in names]}): {message[:2000]}") from e
            counts["clean errors"] += 1
            return None
    counts["loads"] += 1
    return result


@pytest.fixture(scope="module", autouse=True)
def counts(request):
    """Prints the counts once every target has run, with the growth of the peak memory (which must stay small)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield COUNTS
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024          # kB on Linux -> MB
    total = sum(COUNTS.values(), Counter())
    lines = [f"{target:16} {c['cases']:6} cases {c['clean errors']:6} clean errors {c['loads']:6} loads"
             for target, c in sorted(COUNTS.items())]
    lines.append(f"{'all':16} {total['cases']:6} cases {total['clean errors']:6} clean errors {total['loads']:6} "
                 f"loads; peak memory grew {grown:.0f} MB")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line("\ntests/test_fuzz.py:\n" + "\n".join(lines))
    assert grown < 2048, f"the fuzzed loaders took {grown:.0f} MB more memory at their peak"


@contextlib.contextmanager
def folder_with(files):
    """A fresh folder holding files {name: bytes}."""
    with tempfile.TemporaryDirectory(prefix="fuzz-") as name:
        folder = Path(name)
        for file, contents in files.items():
            (folder / file).write_bytes(contents)
        yield folder


# ----------------------------------------------------------------------------------------------------------------------
# Mutations: of JSON trees, of text, of safetensors files, of state dicts

NASTY_NUMBERS = ["0", "-1", "-0", "1.5", "1e400", "-1e400", "1e-400", "NaN", "Infinity", "-Infinity", "9" * 5000,
                 "18446744073709551616", "0x10", "1_0", "+1", ".5", "1e", "00"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2, 2 ** 70) | st.sampled_from([0, -1, 2 ** 31, 2 ** 63, 10 ** 30])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=6)


def _nodes(tree, path=()):
    """Every (path) into a JSON tree, the root () included."""
    yield path
    children = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, child in children:
        yield from _nodes(child, path + (key,))


def mutate_tree(draw, tree, values=json_values):
    """A copy of the JSON tree with one random edit: a value replaced by any JSON value, a key deleted or added."""
    tree = copy.deepcopy(tree)
    path = draw(st.sampled_from(list(_nodes(tree))))
    edit = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
    if not path:
        return draw(values) if edit == "replace" else tree
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    if edit == "replace":
        parent[path[-1]] = draw(values)
    elif edit == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=10))] = draw(values)
    return tree


def mutate_text(draw, text, numbers=NASTY_NUMBERS):
    """Bytes of a damaged JSON text: cut, a character or a number replaced, deeply nested, badly encoded, random."""
    edit = draw(st.sampled_from(["cut", "character", "number", "number", "nesting", "encoding", "random"]))
    if edit == "cut":
        return text[:draw(st.integers(0, len(text)))].encode()
    if edit == "character":
        at = draw(st.integers(0, max(0, len(text) - 1)))
        return (text[:at] + draw(st.characters()) + text[at + 1:]).encode("utf-8", "surrogatepass")
    if edit == "number":
        found = list(re.finditer(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text))
        if found:
            m = draw(st.sampled_from(found))
            return (text[:m.start()] + draw(st.sampled_from(numbers)) + text[m.end():]).encode()
        return text.encode()
    if edit == "nesting":
        depth = draw(st.sampled_from([100, 10_000, 200_000]))
        return (draw(st.sampled_from(["[", '{"a":'])) * depth).encode()
    if edit == "encoding":
        return draw(st.sampled_from([b"\xff\xfe", b"\xef\xbb\xbf", b"\x80"])) + text.encode(
            draw(st.sampled_from(["utf-8", "utf-16", "latin-1"])), "replace")
    return draw(st.binary(max_size=200))


def json_file(draw, tree, values=json_values, numbers=NASTY_NUMBERS):
    """A config file's bytes: the tree with one edit, or its text damaged."""
    if draw(st.integers(0, 3)) == 0:
        return mutate_text(draw, json.dumps(tree), numbers)
    return json.dumps(mutate_tree(draw, tree, values)).encode()


SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "U16", "U32", "U64", "BOOL",
                      "F8_E4M3", "F8_E5M2", "E8M0", "F4", "C64", "X", ""]


def mutate_safetensors(draw, raw):
    """(bytes of a damaged safetensors file, whether only the tensor data changed): its 8-byte header length
    replaced, its JSON header edited (dtype, shape, offsets, entries, metadata) or its text damaged, the file cut,
    bits flipped, bytes appended."""
    size = struct.unpack("<Q", raw[:8])[0]
    header, body = json.loads(raw[8:8 + size]), raw[8 + size:]
    edit = draw(st.sampled_from(["length", "header", "header", "header text", "cut", "flip data", "flip any",
                                 "append"]))
    if edit == "length":
        return struct.pack("<Q", draw(st.integers(0, 2 ** 64 - 1) | st.integers(0, size + 64))) + raw[8:], False
    if edit == "header":
        names = [k for k in header if k != "__metadata__"]
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "entry", "metadata", "tree"]))
        if field == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(SAFETENSORS_DTYPES) | json_values)
        elif field == "shape":
            header[name]["shape"] = draw(st.lists(st.integers(-1, 2 ** 64), max_size=4) | json_values)
        elif field == "data_offsets":
            end = len(body)
            header[name]["data_offsets"] = draw(st.lists(st.integers(-1, end + 8) | st.sampled_from([2 ** 64, 2 ** 63]),
                                                         min_size=2, max_size=2) | json_values)
        elif field == "entry":
            header[draw(st.text(max_size=10))] = header.pop(name) if draw(st.booleans()) else draw(json_values)
        elif field == "metadata":
            header["__metadata__"] = draw(json_values)
        else:
            header = mutate_tree(draw, header)
        text = json.dumps(header).encode()
        return struct.pack("<Q", len(text)) + text + body, False
    if edit == "header text":
        text = mutate_text(draw, raw[8:8 + size].decode())
        return struct.pack("<Q", len(text)) + text + body, False
    if edit == "cut":
        return raw[:draw(st.integers(0, len(raw) - 1))], False
    if edit == "append":
        return raw + draw(st.binary(min_size=1, max_size=64)), False
    start = 8 + size if edit == "flip data" else 0
    flipped = bytearray(raw)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(start, len(raw) - 1))
        flipped[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(flipped), edit == "flip data"


def mutate_state(draw, state):
    """A well-formed safetensors file with the wrong tensors: one dropped, renamed, reshaped, of another dtype, or an
    extra one."""
    state = dict(state)
    name = draw(st.sampled_from(sorted(state)))
    edit = draw(st.sampled_from(["drop", "rename", "reshape", "dtype", "extra"]))
    if edit == "drop":
        del state[name]
    elif edit == "rename":
        state[draw(st.sampled_from([name + "x", name.replace("0", "1"), "x" + name, draw(st.text(max_size=8))]))] = \
            state.pop(name)
    elif edit == "reshape":
        state[name] = torch.zeros(draw(st.lists(st.integers(0, 5), max_size=4)))
    elif edit == "dtype":
        dtype = draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8,
                                      torch.uint8, torch.bool, torch.float8_e4m3fn]))
        state[name] = state[name].to(dtype)
    else:
        state[draw(st.text(min_size=1, max_size=8))] = torch.zeros(draw(st.lists(st.integers(0, 3), max_size=3)))
    return safetensors_bytes(state)


def weights_case(draw, raw, state, bin_too=True):
    """{weights file name: its damaged bytes}, and whether only its tensor data changed, so that it must load: a
    safetensors file, or (bin_too) a pickled pytorch_model.bin cut, with bits flipped or bytes appended."""
    kind = draw(st.sampled_from(["state", "safetensors", "safetensors", "safetensors"] + ["bin"] * bin_too))
    if kind == "state":
        return {"model.safetensors": mutate_state(draw, state)}, False
    if kind == "safetensors":
        weights, must_load = mutate_safetensors(draw, raw)
        return {"model.safetensors": weights}, must_load
    buffer = io.BytesIO()
    torch.save(state, buffer)
    pickled = bytearray(buffer.getvalue())
    edit = draw(st.sampled_from(["cut", "flip", "append"]))
    if edit == "cut":
        return {"pytorch_model.bin": bytes(pickled[:draw(st.integers(0, len(pickled) - 1))])}, False
    if edit == "append":
        return {"pytorch_model.bin": bytes(pickled) + draw(st.binary(min_size=1, max_size=64))}, False
    for _ in range(draw(st.integers(1, 8))):
        pickled[draw(st.integers(0, len(pickled) - 1))] ^= 1 << draw(st.integers(0, 7))
    return {"pytorch_model.bin": bytes(pickled)}, False


def safetensors_bytes(state):
    with tempfile.TemporaryDirectory() as folder:
        save_file({k: v.contiguous() for k, v in state.items()}, Path(folder) / "w.safetensors")
        return (Path(folder) / "w.safetensors").read_bytes()


# ----------------------------------------------------------------------------------------------------------------------
# Tiny checkpoints, written once


class Files(dict):
    """A fixture's files and trees, shown short in hypothesis's reports."""
    __repr__ = lambda self: f"<{', '.join(self)}>"


@pytest.fixture(scope="module")
def lm_files():
    """A Mamba-2 LM: its config.json tree in mamba_ssm's layout and in transformers', weights bytes, state."""
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=16, headdim=16, chunk_size=16))
    state = {"backbone." + k: v.detach().clone() for k, v in model.state_dict().items()}
    official = dict(d_model=32, n_layer=2, vocab_size=50, pad_vocab_size_multiple=8, tie_embeddings=True,
                    ssm_cfg=dict(layer="Mamba2", d_state=16, headdim=16, chunk_size=16, ngroups=1, expand=2))
    hf = dict(model_type="mamba2", hidden_size=32, num_hidden_layers=2, vocab_size=56, num_heads=4, head_dim=16,
              state_size=16, n_groups=1, chunk_size=16, expand=2, conv_kernel=4, tie_word_embeddings=True,
              time_step_limit=[0.0, {"__float__": "Infinity"}])
    return Files(official=official, hf=hf, raw=safetensors_bytes(state), state=state)


def _hf_vision_state(encoder):
    """A VisionEncoder's weights under the Hugging Face names (`checkpoints._hf_names` read backwards)."""
    ours, out = encoder.state_dict(), {}
    for name, (theirs, _) in checkpoints._hf_names(encoder.config).items():
        tensor = ours[name].detach()
        if name == "pos_embed" and encoder.config.arch == "dinov2":          # (1, 1 + grid², width), CLS row first
            out[theirs[0]] = torch.cat([torch.zeros(1, tensor.shape[1]), tensor])[None]
        elif name == "cls_token":                                           # cls + the zero CLS position row
            out[theirs[0]] = tensor.reshape(1, 1, -1)
        else:
            out.update(zip(theirs, (t.clone() for t in tensor.chunk(len(theirs)))))
    return out


@pytest.fixture(scope="module")
def vision_files():
    """arch -> its config.json and preprocessor_config.json trees, weights bytes, state, our parameters' shapes."""
    out = {}
    for arch, model_type in (("siglip", "siglip_vision_model"), ("dinov2", "dinov2")):
        torch.manual_seed(1)
        config = vision.VisionConfig(arch=arch, image_size=16, patch_size=8, width=32, depth=2, heads=2, mlp_dim=64,
                                     pos_grid=2)
        encoder = vision.VisionEncoder(config)
        sizes = (dict(intermediate_size=64) if arch == "siglip" else dict(mlp_ratio=2))
        tree = dict(model_type=model_type, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                    patch_size=8, **sizes)
        processor = dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], size={"height": 16, "width": 16})
        state = _hf_vision_state(encoder)
        out[arch] = Files(tree=tree, processor=processor, raw=safetensors_bytes(state), state=state,
                          shapes={k: tuple(v.shape) for k, v in encoder.state_dict().items()})
    return Files(out)


@pytest.fixture(scope="module")
def mlmamba_files():
    """A tiny MLMamba written by save_pretrained: its config.json tree, weights bytes, state."""
    torch.manual_seed(2)
    config = MLMambaConfig(vision=vision.VisionConfig(image_size=16, patch_size=8, width=32, depth=2, heads=2,
                                                      mlp_dim=64),
                           connector=ConnectorConfig(),
                           lm=Mamba2Config(d_model=32, n_layer=2, vocab_size=50, d_state=16, headdim=16, chunk_size=16))
    model = MLMamba(config)
    with tempfile.TemporaryDirectory() as folder:
        checkpoints.save_pretrained(model, Path(folder) / "ckpt")
        tree = json.loads((Path(folder) / "ckpt" / "config.json").read_text())
        raw = (Path(folder) / "ckpt" / "model.safetensors").read_bytes()
    return Files(tree=tree, raw=raw, state={k: v.detach().clone() for k, v in model.state_dict().items()})


def _check_loaded(model, reference_shapes=None):
    """A correct load: every tensor real (not meta) and, when the config is the reference's, of the reference's shape;
    or, for another config, a forward pass that runs (on images up to 256 px: a config may ask for any size)."""
    assert not any(v.is_meta for v in model.state_dict().values())
    if reference_shapes is not None:
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference_shapes
        return
    if getattr(model, "image_size", 0) > 256:
        return
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        if isinstance(model, Mamba2LM):
            out = model(ids)
        elif isinstance(model, MLMamba):
            out = model(ids, pixel_values=torch.rand(1, 3, model.image_size, model.image_size),
                        has_image=torch.tensor([True]), lengths=torch.tensor([3])).logits
        else:
            out = model(torch.rand(1, 3, model.image_size, model.image_size))
    assert out.shape[0] == 1


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints: weights files and configs


@FUZZ
@given(st.data())
def test_lm_weights(lm_files, data):
    weights, must_load = weights_case(data.draw, lm_files["raw"], lm_files["state"])
    with folder_with({"config.json": json.dumps(lm_files["official"]).encode(), **weights}) as folder:
        model = attempt("lm weights", lambda: load_mamba2(folder), [folder])
    assert model is not None or not must_load, "only the tensor data changed: it must load"
    if model is not None:
        _check_loaded(model, {k.removeprefix("backbone."): tuple(v.shape) for k, v in lm_files["state"].items()})


@FUZZ
@given(st.data())
def test_lm_config(lm_files, data):
    config = json_file(data.draw, lm_files[data.draw(st.sampled_from(["official", "hf"]))])
    with folder_with({"config.json": config, "model.safetensors": lm_files["raw"]}) as folder:
        model = attempt("lm config", lambda: load_mamba2(folder), [folder])
    if model is not None:
        _check_loaded(model)


@FUZZ
@given(st.data())
def test_vision_weights(vision_files, data):
    tower = vision_files[data.draw(st.sampled_from(["siglip", "dinov2"]))]
    weights, must_load = weights_case(data.draw, tower["raw"], tower["state"])
    files = {"config.json": json.dumps(tower["tree"]).encode(), **weights,
             "preprocessor_config.json": json.dumps(tower["processor"]).encode()}
    with folder_with(files) as folder:
        model = attempt("vision weights", lambda: checkpoints.load_vision(folder), [folder])
    assert model is not None or not must_load, "only the tensor data changed: it must load"
    if model is not None:
        _check_loaded(model, tower["shapes"])


@FUZZ
@given(st.data())
def test_vision_config(vision_files, data):
    tower = vision_files[data.draw(st.sampled_from(["siglip", "dinov2"]))]
    files = {"config.json": json.dumps(tower["tree"]).encode(), "model.safetensors": tower["raw"],
             "preprocessor_config.json": json.dumps(tower["processor"]).encode()}
    name = data.draw(st.sampled_from(["config.json", "preprocessor_config.json"]))
    files[name] = json_file(data.draw, tower["tree"] if name == "config.json" else tower["processor"])
    with folder_with(files) as folder:
        model = attempt("vision config", lambda: checkpoints.load_vision(folder), [folder])
    if model is not None:
        _check_loaded(model)


@FUZZ
@given(st.data())
def test_mlmamba_weights(mlmamba_files, data):
    weights, must_load = weights_case(data.draw, mlmamba_files["raw"], mlmamba_files["state"], bin_too=False)
    with folder_with({"config.json": json.dumps(mlmamba_files["tree"]).encode(), **weights}) as folder:
        model = attempt("mlmamba weights", lambda: checkpoints.load_pretrained(folder), [folder])
    assert model is not None or not must_load, "only the tensor data changed: it must load"
    if model is not None:
        _check_loaded(model, {k: tuple(v.shape) for k, v in mlmamba_files["state"].items()})


@FUZZ
@given(st.data())
def test_mlmamba_config(mlmamba_files, data):
    config = json_file(data.draw, mlmamba_files["tree"], json_values, NASTY_NUMBERS)
    with folder_with({"config.json": config, "model.safetensors": mlmamba_files["raw"]}) as folder:
        model = attempt("mlmamba config", lambda: checkpoints.load_pretrained(folder), [folder])
    if model is not None:
        _check_loaded(model)


# ----------------------------------------------------------------------------------------------------------------------
# Images


def _png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@st.composite
def image_files(draw):
    """Bytes of a damaged image: random bytes; a small image in some format and mode, cut or with bits flipped; or a
    PNG with a random (checksummed) header and pixel data, up to past pillow's decompression-bomb limit."""
    kind = draw(st.sampled_from(["random", "encoded", "encoded", "png header"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "png header":
        width, height = draw(st.integers(0, 2 ** 31 - 1) | st.integers(0, 64)), draw(st.integers(0, 2 ** 31 - 1)
                                                                                      | st.integers(0, 64))
        depth, colour = draw(st.sampled_from([1, 2, 4, 8, 16, 3])), draw(st.sampled_from([0, 2, 3, 4, 6, 5]))
        header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, draw(st.integers(0, 1)))
        pixels = zlib.compress(draw(st.binary(max_size=200)))
        return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", pixels)
                + _png_chunk(b"IEND", b""))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA", "ICO"]))
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "I", "CMYK"]))
    size = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    image = Image.frombytes("RGB", size, draw(st.binary(min_size=3 * size[0] * size[1],
                                                         max_size=3 * size[0] * size[1])))
    buffer = io.BytesIO()
    try:
        image.convert(mode).save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):                 # a mode the format cannot hold
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    raw = buffer.getvalue()
    if draw(st.booleans()):
        return raw[:draw(st.integers(0, len(raw)))]
    flipped = bytearray(raw)
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(raw) - 1))
        flipped[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(flipped)


@FUZZ
@given(image_files(), st.sampled_from(vision.RESIZE_STRATEGIES))
def test_images(raw, resize):
    with folder_with({"image.bin": raw}) as folder:
        pixels = attempt("images", lambda: vision.preprocess(folder / "image.bin", 16, resize), [folder / "image.bin"])
    if pixels is not None:
        assert pixels.shape == (3, 16, 16) and pixels.dtype == torch.float32
        assert torch.isfinite(pixels).all() and 0 <= pixels.min() and pixels.max() <= 1


# ----------------------------------------------------------------------------------------------------------------------
# LLaVA records


@pytest.fixture(scope="module")
def text_tokenizer(tmp_path_factory):
    records = data.make_shapes(data.ShapesConfig(image_size=16, n_train=16, n_test=0, seed=0))["train"]
    return load_tokenizer(data.train_tokenizer(records, tmp_path_factory.mktemp("tok") / "sp.model", 300))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Images the records name: a good one, a cut one, one of random bytes, an empty one, and a folder."""
    folder = tmp_path_factory.mktemp("images")
    buffer = io.BytesIO()
    Image.new("RGB", (20, 12), (200, 30, 30)).save(buffer, format="PNG")
    (folder / "good.png").write_bytes(buffer.getvalue())
    (folder / "cut.png").write_bytes(buffer.getvalue()[:70])
    (folder / "random.jpg").write_bytes(bytes(range(7, 107)))
    (folder / "empty.png").write_bytes(b"")
    (folder / "sub").mkdir()
    return folder


odd_text = st.lists(st.text(max_size=10) | st.sampled_from(["\ud800", "\udcff", "\x00", "\ufeff", "\u202e", "\u0301",
                                                          "\U0001f600", "\r", "\u2028"]),
                    max_size=4).map("".join)                                  # lone surrogates too


@st.composite
def marked(draw):
    """Text with <image> markers (or near misses) anywhere, sometimes huge."""
    parts = draw(st.lists(odd_text | st.sampled_from(["<image>", "<image>\n", "\n<image>", "<image", "<IMAGE>",
                                                      "<image><image>"]), max_size=5))
    text = "".join(parts)
    return text * 20_000 if draw(st.integers(0, 30)) == 0 else text


images = st.sampled_from(["good.png"] * 6 + ["cut.png", "random.jpg", "empty.png", "sub", "missing.png", "", ".",
                          "/dev/null", "../good.png", "a" * 5000, "good.png\x00", "\udcff.png"])
ids = st.integers() | st.text(max_size=8)


@st.composite
def well_formed(draw):
    """A record of the right shape (alternating turns, an answer) with odd text, ids and images."""
    values = draw(st.lists(marked(), min_size=1, max_size=3).map(lambda v: v * 2))
    turns = [{"from": "human" if i % 2 == 0 else "gpt", "value": v} for i, v in enumerate(values)]
    record = {"id": draw(ids), "conversations": turns}
    if draw(st.booleans()):
        record["image"] = draw(images)
    return record


turns = st.fixed_dictionaries({}, optional={"from": st.sampled_from(["human", "gpt", "system", ""]) | json_values,
                                            "value": marked() | json_values})
records = well_formed() | well_formed() | st.fixed_dictionaries({}, optional={
    "id": ids | json_values, "image": images | json_values, "conversations": st.lists(turns, max_size=6) | json_values,
    "extra": json_values})


@st.composite
def record_files(draw):
    """Bytes of a LLaVA file: a JSON list or JSON Lines of generated records (good ones among them), or damaged
    text."""
    chosen = draw(st.lists(records | json_values, min_size=0, max_size=3))
    if draw(st.integers(0, 4)) == 0:
        return mutate_text(draw, json.dumps(chosen))
    ascii_only = draw(st.sampled_from([True, True, True, False]))
    if draw(st.booleans()):
        text = json.dumps(chosen, ensure_ascii=ascii_only)
    else:
        text = "\n".join(json.dumps(r, ensure_ascii=ascii_only) for r in chosen)
    return text.encode("utf-8", "surrogatepass")


def _load_and_batch(path, folder, tokenizer, strict):
    """What train.py does with a data file: load and validate, drop unreadable images, tokenise, batch."""
    records = data.load_conversations(path, folder)
    unreadable = dict(data.find_unreadable_images(records, folder))
    dataset = data.ConversationDataset([r for r in records if r["id"] not in unreadable], tokenizer, 16, folder,
                                       max_len=64, strict_images=strict)
    batch = dataset.collate([dataset[i] for i in range(len(dataset))])
    prompts = [data.encode_prompt(tokenizer, t[:-1], t[-1][0]) for t in map(data.conversation_turns, records)]
    return batch, prompts


@FUZZ
@given(record_files(), st.booleans())
def test_records(text_tokenizer, image_folder, raw, strict):
    with folder_with({"train.json": raw}) as folder:
        path = folder / "train.json"
        out = attempt("records", lambda: _load_and_batch(path, image_folder, text_tokenizer, strict), [path, "record "])
    if out is not None:
        batch, prompts = out
        assert batch["input_ids"].shape == batch["labels"].shape and len(prompts) >= len(batch["ids"])
