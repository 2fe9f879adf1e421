"""A checkpoint never runs code: DCP's index is JSON, legacy pickles are read strictly, refusals are hard stops.

Payloads are hand-assembled pickles (raw GLOBAL / STACK_GLOBAL / REDUCE / BUILD opcodes) whose command would
`touch` a marker file; each is first shown to be a live exploit under plain `pickle.loads`, then must be
refused by the checkpoint reader with the marker never appearing. Every entry point that loads a checkpoint
(pretrain resume, generate, evaluate, the checkpoint tool's inspect and consolidate, SFT's init_from) must
stop with one line naming the file and exit 2, never fall back to an older checkpoint.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import pickle
import shutil
import struct
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from llm_dist.checkpoint import CheckpointManager, dcp_metadata, load_checkpoint, sharded
from llm_dist.checkpoint.sharded import FsspecWriter, SafeReader, UnsafeCheckpointError  # FsspecWriter: stock
from llm_dist.config import ModelConfig
from llm_dist.model.transformer import build_model
from llm_dist.tokenizer import ByteTokenizer
from tests.helpers import run_launcher

MD = "torch.distributed.checkpoint.metadata"

# ------------------------------------------------------------------------------------- a pickle assembler


def _s(text: str) -> bytes:
    """BINUNICODE: a str pushed on the stack."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _g(module: str, name: str) -> bytes:
    """GLOBAL (protocols 0-3): `module.name` looked up by the unpickler's find_class."""
    return b"c" + f"{module}\n{name}\n".encode()


def _sg(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4): the name may be dotted, which plain pickle resolves attribute by attribute."""
    return _s(module) + _s(name) + b"\x93"


def _int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _call(fn: bytes, *args: bytes) -> bytes:
    """fn(*args): MARK args TUPLE REDUCE."""
    return fn + b"(" + b"".join(args) + b"tR"


def _attr(obj: bytes, name: str) -> bytes:
    return _call(_g("builtins", "getattr"), obj, _s(name))


def _item(obj: bytes, key: bytes) -> bytes:
    return _call(_attr(obj, "get"), key)


def _pickle(expr: bytes, proto: int = 4) -> bytes:
    return bytes([0x80, proto]) + expr + b"."  # PROTO ... STOP


def _command_payloads(cmd: str) -> dict[str, bytes]:
    """Payloads that run `cmd` under plain pickle.loads: every global the old loader admitted, and more."""
    code = f"import os; os.system({cmd!r})"

    def exec_via_globals(fn: bytes) -> bytes:  # fn.__globals__['__builtins__']['exec'](code)
        return _call(_item(_item(_attr(fn, "__globals__"), _s("__builtins__")), _s("exec")), _s(code))

    def exec_via_dotted_name(module: str, walk: str) -> bytes:  # protocol 4 resolves `walk` attribute by attribute
        return _call(_call(_sg(module, f"{walk}.__builtins__.get"), _s("exec")), _s(code))

    os_globals = _item(_attr(_attr(_g("pathlib", "PosixPath"), "write_text"), "__globals__"), _s("os"))
    storage_meta = _g(MD, "StorageMeta") + b")\x81"  # EMPTY_TUPLE NEWOBJ: an admitted DCP dataclass instance
    copyreg_newobj = _call(_attr(_call(_attr(storage_meta, "__reduce_ex__"), _int(2)), "__getitem__"), _int(0))
    subclasses = _call(_attr(_attr(_attr(_g("torch", "Size"), "__base__"), "__base__"), "__subclasses__"))
    wrap_close = next(i for i, c in enumerate(object.__subclasses__()) if c.__name__ == "_wrap_close")  # in os
    os_module_globals = _attr(_attr(_call(_attr(subclasses, "__getitem__"), _int(wrap_close)), "__init__"),
                              "__globals__")
    return {
        # The reported exploit: getattr + pathlib.PosixPath, both admitted by the old loader.
        "getattr_posixpath_globals_os_system": _pickle(_call(_attr(os_globals, "system"), _s(cmd)), 2),
        "os_system": _pickle(_call(_g("os", "system"), _s(cmd)), 2),
        "posix_system": _pickle(_call(_g("posix", "system"), _s(cmd)), 2),
        "subprocess_getoutput": _pickle(_call(_g("subprocess", "getoutput"), _s(cmd)), 2),
        "builtins_exec": _pickle(_call(_g("builtins", "exec"), _s(code)), 2),
        # Dotted names under modules the old loader admitted (by prefix, or for _get_layout): no getattr needed.
        "dotted_name_in_dcp_module": _pickle(_call(_sg(MD, "os.system"), _s(cmd))),
        "dotted_walk_dcp_class_builtins": _pickle(exec_via_dotted_name(MD, "Metadata.__init__")),
        "dotted_walk_get_layout_builtins": _pickle(exec_via_dotted_name("torch.serialization", "_get_layout")),
        # getattr walks from an admitted DCP class / torch object to __globals__ / __builtins__.
        "getattr_dcp_class_init_globals": _pickle(exec_via_globals(_attr(_g(MD, "Metadata"), "__init__")), 2),
        "getattr_get_layout_globals": _pickle(exec_via_globals(_g("torch.serialization", "_get_layout")), 2),
        "getattr_reduce_ex_walk": _pickle(exec_via_globals(copyreg_newobj), 2),
        "getattr_class_base_subclasses_walk": _pickle(_call(_item(os_module_globals, _s("system")), _s(cmd)), 2),
    }


def _data_payloads(genuine: Metadata) -> dict[str, bytes]:
    """Pickles that run nothing but smuggle non-data into DCP's classes, or misuse the admitted callables."""
    def with_change(change: Callable[[Metadata], None]) -> bytes:
        md = copy.deepcopy(genuine)
        change(md)
        return pickle.dumps(md)

    first = next(k for k, v in genuine.state_dict_metadata.items() if hasattr(v, "properties"))

    def set_props(field: str, value: object) -> Callable[[Metadata], None]:
        return lambda md: setattr(md.state_dict_metadata[first].properties, field, value)

    def first_info(md: Metadata) -> object:
        return next(iter(md.storage_data.values()))

    return {
        "dtype_field_holds_a_class": with_change(set_props("dtype", torch.Size)),
        "dtype_field_holds_a_string": with_change(set_props("dtype", "float32")),
        "dtype_outside_allow_list": with_change(set_props("dtype", torch.qint8)),
        "requires_grad_holds_an_int": with_change(set_props("requires_grad", 1)),
        "chunk_is_another_dataclass": with_change(
            lambda md: md.state_dict_metadata[first].chunks.__setitem__(0, md.storage_meta)),
        "size_holds_a_dict": with_change(lambda md: setattr(md.state_dict_metadata[first], "size", {"a": 1})),
        "relative_path_leaves_the_dir": with_change(lambda md: setattr(first_info(md), "relative_path", "../../x")),
        "planner_data_holds_a_float": with_change(lambda md: md.planner_data.__setitem__(first, (1.5,))),
        "extra_attribute_on_metadata": with_change(lambda md: setattr(md, "hook", "x")),
        "not_a_metadata_at_all": pickle.dumps({"state_dict_metadata": {}}),
        "get_layout_bad_name": _pickle(_call(_g("torch.serialization", "_get_layout"), _s("os")), 2),
        "torch_size_of_strings": _pickle(_call(_g("torch", "Size"), b"(" + _s("a") + b"t"), 2),
        "dcp_class_called_directly": _pickle(_call(_g(MD, "Metadata"), _s("x")), 2),
        "build_sets_attribute_on_a_class": _pickle(_g(MD, "Metadata") + b"N}" + _s("__eq__") + _g("torch", "Size")
                                                   + b"s\x86b", 2),
        "newobj_of_a_non_dcp_class": _pickle(_g("collections", "OrderedDict") + b")\x81", 2),
        "inst_opcode": b"(i" + b"os\nsystem\n" + b".",
        "persistent_id": _pickle(_s("x") + b"Q", 2),
    }


# --------------------------------------------------------------------------------------------- fixtures


def _model_opt(seed: int):  # noqa: ANN202
    model = build_model(ModelConfig(vocab_size=64, n_layer=1, n_embd=32, n_head=2, block_size=16), "cpu", seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def _save(ckpt_dir: Path, async_save: bool = False) -> str:
    model, opt = _model_opt(0)
    mgr = CheckpointManager(str(ckpt_dir), async_save=async_save)
    url = mgr.save(3, sharded.model_optim_state(model, opt), {"trainer": {"step": 3}}, "out_dir: x\n", ByteTokenizer(),
                   "byte")
    mgr.close()
    return url


@pytest.fixture(scope="module")
def legacy_dcp(tmp_path_factory) -> tuple[Path, Metadata]:
    """A DCP dir written by the stock FsspecWriter (pickled .metadata), and its genuine metadata."""
    d = tmp_path_factory.mktemp("legacy") / "dcp"
    model, opt = _model_opt(0)
    dcp.save(sharded.model_optim_state(model, opt), storage_writer=FsspecWriter(str(d)))
    return d, pickle.loads((d / ".metadata").read_bytes())  # trusted: written just above


def _equal_states(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not isinstance(y, dict) or not _equal_states(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


# --------------------------------------------------------------------------------- format and round trips


def test_json_metadata_round_trip_sync_and_async(tmp_path: Path) -> None:
    for sub, async_save in (("sync", False), ("async", True)):
        url = _save(tmp_path / sub, async_save)
        d = Path(url) / "dcp"
        assert (d / ".metadata.json").is_file() and not (d / ".metadata").exists()
        assert not list(d.glob("*.tmp"))
        assert json.loads((d / ".metadata.json").read_text())["format"] == dcp_metadata.FORMAT
        meta = json.loads((Path(url) / "meta.json").read_text())
        assert "dcp/.metadata.json" in meta["files"] and "dcp/.metadata" not in meta["files"]
        md = SafeReader(str(d)).read_metadata()
        assert dcp_metadata.decode(json.loads(dcp_metadata.dumps_json(md))) == md  # decode(encode(x)) == x
        model, opt = _model_opt(0)
        model2, opt2 = _model_opt(1)
        load_checkpoint(url, model2, opt2)
        assert _equal_states(sharded.model_optim_state(model, opt), sharded.model_optim_state(model2, opt2))


def test_legacy_checkpoint_loads_through_the_strict_path(legacy_dcp) -> None:
    d, genuine = legacy_dcp
    assert SafeReader(str(d)).read_metadata().state_dict_metadata == genuine.state_dict_metadata
    assert dcp_metadata.unpickle_legacy((d / ".metadata").read_bytes()) == genuine
    model, opt = _model_opt(0)
    model2, opt2 = _model_opt(1)
    state = sharded.model_optim_state(model2, opt2)
    sharded.load(state, str(d))
    sharded.apply_model_optim_state(model2, opt2, state)
    assert _equal_states(sharded.model_optim_state(model, opt), sharded.model_optim_state(model2, opt2))


def test_unsupported_metadata_refuses_to_save(tmp_path: Path) -> None:
    """A value the JSON cannot carry fails the save (nothing written), never silently dropped."""
    writer = sharded.SafeWriter(str(tmp_path))
    writer.set_up_storage_writer(True)
    md = Metadata(state_dict_metadata={}, planner_data={"k": ("a", 1.5)})
    with pytest.raises(sharded.MetadataSaveError,
                       match=r"refusing to save.*planner_data\['k'\]\[1\]: expected str or int, got float"):
        writer.finish(md, [])
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------- adversarial input


def _refused(d: Path, marker: Path) -> str:
    with pytest.raises(UnsafeCheckpointError) as info:
        sharded.load({"model": {}}, str(d), partial=True)
    assert not marker.exists()
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {d}/.metadata") and msg.endswith("(refusing to load it)")
    return msg


def test_pickle_payloads_are_live_and_refused(tmp_path: Path, legacy_dcp) -> None:
    live = tmp_path / "live"
    for name, payload in _command_payloads(f"touch {live}").items():  # the payloads really run code...
        try:
            pickle.loads(payload)
        except Exception:  # noqa: BLE001, S110 - some return a value that fails afterwards; the command ran first
            pass
        assert live.exists(), f"{name} is not a working exploit under plain pickle"
        live.unlink()
    src, genuine = legacy_dcp
    d = tmp_path / "dcp"
    shutil.copytree(src, d)
    marker = tmp_path / "pwned"
    expect = {"getattr_posixpath_globals_os_system": "refers to builtins.getattr,",
              "os_system": "refers to os.system,", "posix_system": "refers to posix.system,",
              "dotted_name_in_dcp_module": f"refers to {MD}.os.system,",
              "dotted_walk_get_layout_builtins": "refers to torch.serialization._get_layout.__builtins__.get,",
              "getattr_reduce_ex_walk": "refers to builtins.getattr,",
              "dcp_class_called_directly": f"calls {MD}.Metadata, which a checkpoint may not do",
              "build_sets_attribute_on_a_class": "sets the state of",
              "inst_opcode": "uses the pickle opcode INST", "persistent_id": "uses the pickle opcode BINPERSID",
              "dtype_field_holds_a_class": "dtype: expected a torch.dtype, got type",
              "dtype_outside_allow_list": "refers to torch.qint8,",
              "relative_path_leaves_the_dir": "expected a file name inside the checkpoint directory",
              "extra_attribute_on_metadata": "gives Metadata the attribute 'hook', which is not one of its fields"}
    payloads = {**_command_payloads(f"touch {marker}"), **_data_payloads(genuine)}
    for name, payload in payloads.items():  # ...but never through the checkpoint reader
        for data in (payload, payload + b" " * 64):  # also padded, as to a recorded file size
            (d / ".metadata").write_bytes(data)
            msg = _refused(d, marker)
            if data is payload:  # (padded, a pickle that runs nothing may be refused for the padding first)
                assert expect.get(name, "") in msg, (name, msg)
    assert torch.Size.__eq__ is tuple.__eq__ and "__eq__" in vars(Metadata)  # no class was modified
    (d / ".metadata").write_bytes(pickle.dumps(genuine) + b"\0" * 8)  # genuine, but with bytes appended
    assert "8 bytes after the end of the pickle" in _refused(d, marker)


def _json_doc(legacy_dcp) -> dict:
    return json.loads(dcp_metadata.dumps_json(legacy_dcp[1]))


def _tensor_entry(doc: dict) -> dict:
    return next(v for v in doc["metadata"]["state_dict_metadata"].values() if v["type"] == "tensor")


JSON_CASES: dict[str, tuple[Callable[[dict], object], str]] = {
    "dtype_not_allowed": (lambda d: _tensor_entry(d)["properties"].__setitem__("dtype", "qint8"),
                          "'qint8' is not one of the allowed values"),
    "dtype_attribute_name": (lambda d: _tensor_entry(d)["properties"].__setitem__("dtype", "__class__"),
                             "'__class__' is not one of the allowed values"),
    "dtype_not_a_string": (lambda d: _tensor_entry(d)["properties"].__setitem__("dtype", {"x": 1}),
                           "dtype: expected str, got dict"),
    "size_holds_a_string": (lambda d: _tensor_entry(d)["size"].__setitem__(0, "3"), "expected int, got str"),
    "bool_for_an_int": (lambda d: d["metadata"]["storage_data"][0]["info"].__setitem__("offset", True),
                        "info.offset: expected int, got bool"),
    "negative_length": (lambda d: d["metadata"]["storage_data"][0]["info"].__setitem__("length", -1),
                        "expected a non-negative integer"),
    "int_for_a_bool": (lambda d: _tensor_entry(d)["properties"].__setitem__("requires_grad", 0),
                       "requires_grad: expected bool, got int"),
    "unknown_key": (lambda d: _tensor_entry(d).__setitem__("__reduce__", "x"), "unknown key '__reduce__'"),
    "missing_key": (lambda d: _tensor_entry(d).pop("chunks"), "missing key 'chunks'"),
    "path_traversal": (lambda d: d["metadata"]["storage_data"][0]["info"].__setitem__("relative_path", "../x"),
                       "expected a file name inside the checkpoint directory"),
    "unknown_entry_type": (lambda d: _tensor_entry(d).__setitem__("type", "pickle"), "expected 'tensor' or 'bytes'"),
    "newer_format": (lambda d: d.__setitem__("format_version", 2), "format_version: expected 1, got 2"),
    "duplicate_storage_key": (lambda d: d["metadata"]["storage_data"].append(d["metadata"]["storage_data"][0]),
                              "a second entry for"),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_json_metadata_with_wrong_types_is_refused(tmp_path: Path, legacy_dcp, case: str) -> None:
    change, expected = JSON_CASES[case]
    doc = _json_doc(legacy_dcp)
    change(doc)
    d = tmp_path / "dcp"
    d.mkdir()
    (d / ".metadata.json").write_text(json.dumps(doc))
    (d / ".metadata").write_bytes(pickle.dumps(legacy_dcp[1]))  # the JSON wins: a pickle beside it is never read
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata\.json: .*\(refusing to load it\)") as info:
        SafeReader(str(d)).read_metadata()
    assert expected in str(info.value), str(info.value)


def test_json_metadata_that_is_not_json_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "dcp"
    d.mkdir()
    for data, expected in ((b'{"format": NaN}', "contains NaN"), (b"\x80\x04K\x01.", "is a pickle, not the JSON index"),
                           (b"\xff{}", "not UTF-8"), (b"[1] [2]", "Extra data"),
                           (b"[1, 2]", "document: expected dict, got list"), (b"[" * 100000, "nested too deeply")):
        (d / ".metadata.json").write_bytes(data)
        with pytest.raises(UnsafeCheckpointError, match=expected):
            SafeReader(str(d)).read_metadata()


def test_a_pickle_with_an_enum_pickled_by_name_is_refused(legacy_dcp) -> None:
    """Python 3.11-3.13 pickle DCP's enum by value; a `getattr`-by-name form is not genuine and is refused."""
    class ByName(pickle.Pickler):
        def reducer_override(self, obj):  # noqa: ANN001, ANN202
            if type(obj) is dcp_metadata._MemFormat:
                return getattr, (type(obj), obj.name)
            return NotImplemented

    buf = io.BytesIO()
    ByName(buf).dump(legacy_dcp[1])
    with pytest.raises(dcp_metadata.MetadataRefused, match="refers to builtins.getattr"):
        dcp_metadata.unpickle_legacy(buf.getvalue())


# ---------------------------------------------------------------------------------------- entry points


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prepared_byte_data: Path) -> Path:
    """A 4-step debug run with checkpoints at steps 2 and 4 (about 5 s); copied by every case."""
    out = tmp_path_factory.mktemp("safety") / "run"
    run_launcher(_pretrain_args(prepared_byte_data, out, 4))
    return out


def _pretrain_args(data: Path, out: Path, steps: int) -> list[str]:
    return ["launch/pretrain.py", "--config", "configs/debug.yaml", f"out_dir={out}", f"data.dir={data}",
            f"train.max_steps={steps}", "checkpoint.interval=2", "checkpoint.keep_last_k=0", "eval.interval=0",
            "eval.steps=1", "eval.sample_tokens=0", "train.detect_anomaly=false"]


def _reseal(ckpt: Path) -> None:
    """What an attacker who can write the checkpoint also does: make meta.json's record of the files (sizes,
    and block CRC-32s when it has a `checksums` record) match the edited files, so that `verify` passes:
    sizes and checksums detect accidents, not someone who rewrites meta.json too."""
    meta_path = ckpt / "meta.json"
    meta = json.loads(meta_path.read_text())
    new = dict(meta)
    rels = [p.relative_to(ckpt).as_posix() for p in sorted(ckpt.rglob("*")) if p.is_file()]
    rels = [r for r in rels if r not in ("meta.json", "COMPLETE")]
    new["files"] = {r: (ckpt / r).stat().st_size for r in rels}
    record = meta.get("checksums")
    if isinstance(record, dict) and record.get("algorithm") == "crc32":
        block = int(record.get("block_bytes", 64 << 20))

        def crcs(data: bytes) -> list[str]:
            return [f"{zlib.crc32(data[i:i + block]) & 0xFFFFFFFF:08x}" for i in range(0, max(len(data), 1), block)]

        new["checksums"] = {**record, "files": {r: crcs((ckpt / r).read_bytes()) for r in rels}}
    if new != meta:
        meta_path.write_text(json.dumps(new, indent=1))


def _exploit(marker: Path) -> bytes:
    return _command_payloads(f"touch {marker}")["getattr_posixpath_globals_os_system"]


def _craft(ckpt: Path, variant: str, marker: Path) -> Path:
    """Tamper with checkpoint `ckpt`; returns the metadata file the error must name.

    legacy: the JSON index removed, the exploit written as a pickled `.metadata` (an "old checkpoint").
    padded: the JSON index overwritten in place by the exploit padded to its exact size (sizes unchanged).
    legacy_padded: first made a genuine legacy checkpoint, then its pickle replaced by the padded exploit.
    """
    d = ckpt / "dcp"
    payload = _exploit(marker)
    if variant == "padded":
        target = d / ".metadata.json"
        target.write_bytes(payload.ljust(target.stat().st_size, b" "))
    else:
        target = d / ".metadata"
        genuine = pickle.dumps(SafeReader(str(d)).read_metadata())  # this checkpoint's index, as stock DCP wrote it
        (d / ".metadata.json").unlink()
        target.write_bytes(genuine)
        _reseal(ckpt)  # now a genuine legacy checkpoint
        assert len(payload) < len(genuine)
        target.write_bytes(payload if variant == "legacy" else payload.ljust(len(genuine), b" "))
    _reseal(ckpt)  # a no-op when the size is unchanged and meta.json records only sizes
    return target


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _sft_data(tmp: Path) -> Path:
    path = tmp / "sft.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "response": str(2 * a)}) + "\n" for a in range(16)))
    return path


ENTRY_POINTS: dict[str, Callable[[Path, Path, Path], list[str]]] = {
    # (run dir, prepared data, scratch dir) -> argv
    "pretrain_resume": lambda run, data, tmp: _pretrain_args(data, run, 6),  # resume=auto by default
    "generate": lambda run, data, tmp: ["launch/generate.py", "--checkpoint", str(run), "--max-new-tokens", "2"],
    "evaluate": lambda run, data, tmp: ["launch/evaluate.py", "--checkpoint", str(run), "--data-dir", str(data),
                                        "--steps", "1"],
    "inspect": lambda run, data, tmp: ["tools/checkpoint.py", "inspect", str(run)],
    "consolidate": lambda run, data, tmp: ["tools/checkpoint.py", "consolidate", str(run), "--out",
                                           str(tmp / "m.safetensors")],
    "sft_init_from": lambda run, data, tmp: [
        "launch/sft.py", "model.preset=debug", "tokenizer.name=byte", f"sft.data={_sft_data(tmp)}",
        f"sft.init_from={run}", "train.max_steps=1", "train.batch_size=2", "train.micro_batch_size=2",
        "parallel.device=cpu", "eval.interval=0", f"out_dir={tmp / 'sft'}"],
}
# Every entry point once, and the resume (where a refusal used to become a silent fallback) with both padded
# variants: the new JSON index and the original attack on a legacy pickle, each at its recorded size.
CASES = [("pretrain_resume", "padded"), ("pretrain_resume", "legacy_padded"), ("generate", "legacy"),
         ("evaluate", "padded"), ("inspect", "legacy_padded"), ("consolidate", "legacy"), ("sft_init_from", "padded")]


@pytest.mark.parametrize("entry, variant", CASES)
def test_entry_points_refuse_a_crafted_checkpoint(tmp_path: Path, run_dir: Path, prepared_byte_data: Path,
                                                   entry: str, variant: str) -> None:
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    newest = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    target = _craft(newest, variant, marker)
    before = _digest(run / "checkpoints")
    p = run_launcher(ENTRY_POINTS[entry](run, prepared_byte_data, tmp_path), check=False, timeout=120)
    out = p.stdout + p.stderr
    assert p.returncode == 2, out[-3000:]
    last = p.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: ") and f"checkpoint {target}: " in last and "refusing to load it" in last, last
    assert ("refers to builtins.getattr" if variant.startswith("legacy") else "is a pickle, not the JSON index") in last
    assert "Traceback" not in out and "resumed from" not in out, out[-3000:]
    assert not marker.exists()
    assert _digest(run / "checkpoints") == before  # nothing written, pruned or "repaired"
    assert not (tmp_path / "m.safetensors").exists()
