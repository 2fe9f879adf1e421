"""DCP's checkpoint index (`Metadata`) as plain data: a JSON codec, and a strict reader for legacy pickles.

Stock DCP pickles its `Metadata` to `.metadata` and reads it back with `pickle.load`, so whoever can write a
checkpoint can run code wherever it is loaded. Here the index is JSON (`encode` / `decode`), checked field by
field against the exact DCP dataclasses, and rebuilt from those classes alone; a value the format cannot
represent is refused when saving rather than dropped.

Legacy checkpoints (a pickled `.metadata`, no JSON) go through `unpickle_legacy`: a pure-Python unpickler
whose opcodes, globals and calls are each limited to what a genuine DCP pickle contains (found by
disassembling stock ones), whose result is then re-encoded and decoded by the same strict codec, so what
reaches DCP is always freshly built from checked data.

Every refusal is a `MetadataRefused` with a one-line reason naming where in the document it failed.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from typing import Any, Callable

import torch
from torch.distributed.checkpoint import filesystem as _dcp_fs
from torch.distributed.checkpoint import metadata as _dcp_md
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, StorageMeta, TensorProperties,
                                                   TensorStorageMetadata)

_StorageInfo = _dcp_fs._StorageInfo  # private in torch, but it is what storage_data holds (same in 2.11..2.13)
_MemFormat = _dcp_md._MEM_FORMAT_ENCODING  # how stock DCP pickles TensorProperties.memory_format

FORMAT = "llm_dist.dcp_metadata"
FORMAT_VERSION = 1


class MetadataRefused(ValueError):
    """The metadata is not a plain, well-typed DCP index (or, when saving, holds a value JSON cannot carry)."""


# ------------------------------------------------------------------------------------- allow-lists (by name)

# Names, not objects, are what the JSON stores; attributes a given torch build lacks are skipped.
_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32", "int64",
                "int32", "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool", "float8_e4m3fn",
                "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu")
_LAYOUT_NAMES = ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc")
# Exactly the memory formats DCP's own TensorProperties pickling can encode.
_MEMORY_FORMAT_NAMES = ("contiguous_format", "channels_last", "preserve_format")


def _named(names: tuple[str, ...], kind: type) -> dict[str, Any]:
    return {n: getattr(torch, n) for n in names if isinstance(getattr(torch, n, None), kind)}


DTYPES: dict[str, torch.dtype] = _named(_DTYPE_NAMES, torch.dtype)
LAYOUTS: dict[str, torch.layout] = _named(_LAYOUT_NAMES, torch.layout)
MEMORY_FORMATS: dict[str, torch.memory_format] = _named(_MEMORY_FORMAT_NAMES, torch.memory_format)
_DTYPE_NAME = {v: k for k, v in DTYPES.items()}
_LAYOUT_NAME = {v: k for k, v in LAYOUTS.items()}
_MEMORY_FORMAT_NAME = {v: k for k, v in MEMORY_FORMATS.items()}

# The fields this format knows, per class (torch 2.11-2.13). A field the installed class has beyond these is
# accepted only at its default value, so a newer torch that adds one never has its value silently dropped.
_KNOWN_FIELDS: dict[type, tuple[str, ...]] = {
    Metadata: ("state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version"),
    TensorStorageMetadata: ("properties", "size", "chunks"),
    BytesStorageMetadata: (),
    ChunkStorageMetadata: ("offsets", "sizes"),
    TensorProperties: ("dtype", "layout", "requires_grad", "memory_format", "pin_memory"),
    StorageMeta: ("checkpoint_id", "save_id", "load_id", "modules"),
    MetadataIndex: ("fqn", "offset", "index"),
    _StorageInfo: ("relative_path", "offset", "length", "transform_descriptors"),
}


# ------------------------------------------------------------------------------------------------ checking


def _tname(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _fail(where: str, what: str) -> MetadataRefused:
    return MetadataRefused(f"{where}: {what}")


def _want(x: Any, types: tuple[type, ...], where: str) -> Any:
    """`x` if its exact type is one of `types` (no subclasses: a bool is not an int, a str subclass is not str)."""
    if type(x) not in types:
        names = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise _fail(where, f"expected {names}, got {_tname(x)}")
    return x


def _str(x: Any, where: str) -> str:
    return _want(x, (str,), where)


def _opt_str(x: Any, where: str) -> str | None:
    return _want(x, (str, type(None)), where)


def _bool(x: Any, where: str) -> bool:
    return _want(x, (bool,), where)


def _count(x: Any, where: str) -> int:
    if _want(x, (int,), where) < 0:
        raise _fail(where, f"expected a non-negative integer, got {x}")
    return x


def _ints(x: Any, where: str, container: type) -> list[int]:
    """A shape/offset: a `container` (list in JSON, torch.Size in DCP objects) of non-negative ints."""
    _want(x, (container,), where)
    return [_count(v, f"{where}[{i}]") for i, v in enumerate(x)]


def _obj(x: Any, keys: tuple[str, ...], where: str) -> dict:
    """A JSON object with exactly `keys` (unknown keys are refused, none may be missing)."""
    _want(x, (dict,), where)
    unknown = [k for k in x if k not in keys]
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r} (expected {', '.join(keys) or 'none'})")
    missing = [k for k in keys if k not in x]
    if missing:
        raise _fail(where, f"missing key {missing[0]!r}")
    return x


def _file_name(x: Any, where: str) -> str:
    """A shard file name inside the checkpoint directory: DCP writes flat names (`__0_0.distcp`); a path
    that leaves the directory (or is absolute) would make the reader open files elsewhere."""
    _str(x, where)
    if not x or x in (".", "..") or any(c in x for c in "/\\\0") or ":" in x:
        raise _fail(where, f"expected a file name inside the checkpoint directory, got {x!r}")
    return x


# ----------------------------------------------------------------------------- DCP objects -> plain data


def _fields(obj: Any, cls: type, where: str) -> dict[str, Any]:
    """The field values of `obj`, which must be exactly a `cls` (read from its __dict__, never via getattr,
    so nothing of the object's own runs); fields beyond this format's must hold their defaults."""
    if type(obj) is not cls:
        raise _fail(where, f"expected {cls.__name__}, got {_tname(obj)}")
    state = vars(obj)
    declared = {f.name: f for f in dataclasses.fields(cls)}
    extra = [k for k in state if k not in declared]
    if extra:
        raise _fail(where, f"{cls.__name__} has an unexpected attribute {extra[0]!r}")
    out = {}
    for name, f in declared.items():
        if name in state:
            value = state[name]
        elif f.default is not dataclasses.MISSING:
            value = f.default  # a field left out of the pickled state (e.g. _StorageInfo drops Nones)
        else:
            raise _fail(where, f"{cls.__name__} is missing its field {name!r}")
        if name not in _KNOWN_FIELDS[cls] and value is not None and value != _default(f):
            raise _fail(f"{where}.{name}", f"{cls.__name__}.{name}={value!r} cannot be stored by this format")
        out[name] = value
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _enc_lookup(x: Any, table: dict, kind: type, where: str) -> str:
    if type(x) is not kind:
        raise _fail(where, f"expected a {kind.__module__}.{kind.__name__}, got {_tname(x)}")
    if x not in table:
        raise _fail(where, f"{x} is not one of the supported values ({', '.join(table.values())})")
    return table[x]


def _enc_properties(p: Any, where: str) -> dict:
    f = _fields(p, TensorProperties, where)
    return {"dtype": _enc_lookup(f["dtype"], _DTYPE_NAME, torch.dtype, f"{where}.dtype"),
            "layout": _enc_lookup(f["layout"], _LAYOUT_NAME, torch.layout, f"{where}.layout"),
            "requires_grad": _bool(f["requires_grad"], f"{where}.requires_grad"),
            "memory_format": _enc_lookup(f["memory_format"], _MEMORY_FORMAT_NAME, torch.memory_format,
                                         f"{where}.memory_format"),
            "pin_memory": _bool(f["pin_memory"], f"{where}.pin_memory")}


def _enc_storage(md: Any, where: str) -> dict:
    if type(md) is BytesStorageMetadata:
        _fields(md, BytesStorageMetadata, where)
        return {"type": "bytes"}
    f = _fields(md, TensorStorageMetadata, where)
    chunks = _want(f["chunks"], (list,), f"{where}.chunks")
    enc_chunks = []
    for i, c in enumerate(chunks):
        cf = _fields(c, ChunkStorageMetadata, f"{where}.chunks[{i}]")
        enc_chunks.append({"offsets": _ints(cf["offsets"], f"{where}.chunks[{i}].offsets", torch.Size),
                           "sizes": _ints(cf["sizes"], f"{where}.chunks[{i}].sizes", torch.Size)})
    return {"type": "tensor", "properties": _enc_properties(f["properties"], f"{where}.properties"),
            "size": _ints(f["size"], f"{where}.size", torch.Size), "chunks": enc_chunks}


def _enc_planner_data(pd: Any, where: str) -> dict | None:
    """DefaultSavePlanner's flattening map {flat key: path of str/int keys}; None when not flattened."""
    if pd is None:
        return None
    _want(pd, (dict,), where)
    out = {}
    for k, path in pd.items():
        _str(k, f"{where} key")
        _want(path, (tuple,), f"{where}[{k!r}]")
        out[k] = [_want(p, (str, int), f"{where}[{k!r}][{i}]") for i, p in enumerate(path)]
    return out


def _enc_storage_data(sd: Any, where: str) -> list:
    _want(sd, (dict,), where)
    out = []
    for i, (idx, info) in enumerate(sd.items()):
        w = f"{where}[{i}]"
        fi = _fields(idx, MetadataIndex, f"{w}.index")
        offset = None if fi["offset"] is None else _ints(fi["offset"], f"{w}.index.offset", torch.Size)
        index = _want(fi["index"], (int, type(None)), f"{w}.index.index")
        fs = _fields(info, _StorageInfo, f"{w}.info")
        td = fs.get("transform_descriptors")
        if td is not None:
            _want(td, (list, tuple), f"{w}.info.transform_descriptors")
            td = {"kind": type(td).__name__, "items": [_str(t, f"{w}.info.transform_descriptors[{j}]")
                                                       for j, t in enumerate(td)]}
        out.append({"index": {"fqn": _str(fi["fqn"], f"{w}.index.fqn"), "offset": offset, "index": index},
                    "info": {"relative_path": _file_name(fs["relative_path"], f"{w}.info.relative_path"),
                             "offset": _count(fs["offset"], f"{w}.info.offset"),
                             "length": _count(fs["length"], f"{w}.info.length"), "transform_descriptors": td}})
    return out


def _enc_storage_meta(sm: Any, where: str) -> dict | None:
    if sm is None:
        return None
    f = _fields(sm, StorageMeta, where)
    modules = _want(f.get("modules", []), (list,), f"{where}.modules")
    return {"checkpoint_id": _opt_str(f["checkpoint_id"], f"{where}.checkpoint_id"),
            "save_id": _opt_str(f["save_id"], f"{where}.save_id"),
            "load_id": _opt_str(f["load_id"], f"{where}.load_id"),
            "modules": [_str(m, f"{where}.modules[{i}]") for i, m in enumerate(modules)]}


def encode(metadata: Metadata) -> dict:
    """`metadata` as a JSON-ready document; raises `MetadataRefused` for any value it cannot represent exactly.

    A field this format knows but the installed torch's class lacks (an older torch) is written as its
    neutral value (None, or [] for `StorageMeta.modules`)."""
    f = _fields(metadata, Metadata, "metadata")
    sdm = _want(f["state_dict_metadata"], (dict,), "state_dict_metadata")
    entries = {}
    for k, v in sdm.items():
        entries[_str(k, "state_dict_metadata key")] = _enc_storage(v, f"state_dict_metadata[{k!r}]")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": {
        "version": _opt_str(f.get("version"), "version"),
        "state_dict_metadata": entries,
        "planner_data": _enc_planner_data(f["planner_data"], "planner_data"),
        "storage_data": _enc_storage_data(f["storage_data"], "storage_data"),
        "storage_meta": _enc_storage_meta(f["storage_meta"], "storage_meta")}}


# ------------------------------------------------------------------------------- plain data -> DCP objects


def _build(cls: type, where: str, **values: Any) -> Any:
    """`cls(**values)`, leaving out a field this torch's class lacks (an older torch) when it holds its neutral
    value (None or empty); any other value there cannot be represented and is refused."""
    have = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k in have:
            kwargs[k] = v
        elif v is not None and v != []:
            raise _fail(f"{where}.{k}", f"this torch's {cls.__name__} has no field {k!r} to hold {v!r}")
    return cls(**kwargs)


def _dec_lookup(x: Any, table: dict, where: str) -> Any:
    _str(x, where)
    if x not in table:
        raise _fail(where, f"{x!r} is not one of the allowed values ({', '.join(table)})")
    return table[x]


def _dec_properties(p: Any, where: str) -> TensorProperties:
    _obj(p, _KNOWN_FIELDS[TensorProperties], where)
    return _build(TensorProperties, where, dtype=_dec_lookup(p["dtype"], DTYPES, f"{where}.dtype"),
                  layout=_dec_lookup(p["layout"], LAYOUTS, f"{where}.layout"),
                  requires_grad=_bool(p["requires_grad"], f"{where}.requires_grad"),
                  memory_format=_dec_lookup(p["memory_format"], MEMORY_FORMATS, f"{where}.memory_format"),
                  pin_memory=_bool(p["pin_memory"], f"{where}.pin_memory"))


def _dec_storage(md: Any, where: str) -> TensorStorageMetadata | BytesStorageMetadata:
    _want(md, (dict,), where)
    kind = md.get("type")
    if kind == "bytes":
        _obj(md, ("type",), where)
        return BytesStorageMetadata()
    if kind != "tensor":
        raise _fail(f"{where}.type", f"expected 'tensor' or 'bytes', got {kind!r}")
    _obj(md, ("type", "properties", "size", "chunks"), where)
    chunks = []
    for i, c in enumerate(_want(md["chunks"], (list,), f"{where}.chunks")):
        w = f"{where}.chunks[{i}]"
        _obj(c, _KNOWN_FIELDS[ChunkStorageMetadata], w)
        chunks.append(_build(ChunkStorageMetadata, w, offsets=torch.Size(_ints(c["offsets"], f"{w}.offsets", list)),
                             sizes=torch.Size(_ints(c["sizes"], f"{w}.sizes", list))))
    return _build(TensorStorageMetadata, where, properties=_dec_properties(md["properties"], f"{where}.properties"),
                  size=torch.Size(_ints(md["size"], f"{where}.size", list)), chunks=chunks)


def _dec_planner_data(pd: Any, where: str) -> dict | None:
    if pd is None:
        return None
    _want(pd, (dict,), where)
    return {k: tuple(_want(p, (str, int), f"{where}[{k!r}][{i}]")
                     for i, p in enumerate(_want(path, (list,), f"{where}[{k!r}]")))
            for k, path in pd.items()}


def _dec_storage_data(sd: Any, where: str) -> dict:
    out: dict = {}
    for i, item in enumerate(_want(sd, (list,), where)):
        w = f"{where}[{i}]"
        _obj(item, ("index", "info"), w)
        idx, info = _obj(item["index"], _KNOWN_FIELDS[MetadataIndex], f"{w}.index"), item["info"]
        offset = idx["offset"]
        if offset is not None:
            offset = _ints(offset, f"{w}.index.offset", list)
        key = MetadataIndex(_str(idx["fqn"], f"{w}.index.fqn"), offset,
                            _want(idx["index"], (int, type(None)), f"{w}.index.index"))
        if key in out:
            raise _fail(w, f"a second entry for {key.fqn!r} at offset {offset}")
        _obj(info, _KNOWN_FIELDS[_StorageInfo], f"{w}.info")
        td = info["transform_descriptors"]
        if td is not None:
            _obj(td, ("kind", "items"), f"{w}.info.transform_descriptors")
            kind = _dec_lookup(td["kind"], {"list": list, "tuple": tuple}, f"{w}.info.transform_descriptors.kind")
            td = kind(_str(t, f"{w}.info.transform_descriptors.items[{j}]")
                      for j, t in enumerate(_want(td["items"], (list,), f"{w}.info.transform_descriptors.items")))
        out[key] = _build(_StorageInfo, f"{w}.info",
                          relative_path=_file_name(info["relative_path"], f"{w}.info.relative_path"),
                          offset=_count(info["offset"], f"{w}.info.offset"),
                          length=_count(info["length"], f"{w}.info.length"), transform_descriptors=td)
    return out


def _dec_storage_meta(sm: Any, where: str) -> StorageMeta | None:
    if sm is None:
        return None
    _obj(sm, _KNOWN_FIELDS[StorageMeta], where)
    return _build(StorageMeta, where, checkpoint_id=_opt_str(sm["checkpoint_id"], f"{where}.checkpoint_id"),
                  save_id=_opt_str(sm["save_id"], f"{where}.save_id"),
                  load_id=_opt_str(sm["load_id"], f"{where}.load_id"),
                  modules=[_str(m, f"{where}.modules[{i}]")
                           for i, m in enumerate(_want(sm["modules"], (list,), f"{where}.modules"))])


def decode(doc: Any) -> Metadata:
    """The DCP `Metadata` a document from `encode` describes, built only from the DCP classes; any key,
    type or value outside the format raises `MetadataRefused` naming where."""
    _obj(doc, ("format", "format_version", "metadata"), "document")
    if doc["format"] != FORMAT:
        raise _fail("format", f"expected {FORMAT!r}, got {doc['format']!r}")
    if _want(doc["format_version"], (int,), "format_version") != FORMAT_VERSION:
        raise _fail("format_version", f"expected {FORMAT_VERSION}, got {doc['format_version']} (written by a newer "
                                      "llm_dist?)")
    md = _obj(doc["metadata"], _KNOWN_FIELDS[Metadata], "metadata")
    sdm = _want(md["state_dict_metadata"], (dict,), "state_dict_metadata")
    return _build(Metadata, "metadata",
                  state_dict_metadata={k: _dec_storage(v, f"state_dict_metadata[{k!r}]") for k, v in sdm.items()},
                  planner_data=_dec_planner_data(md["planner_data"], "planner_data"),
                  storage_data=_dec_storage_data(md["storage_data"], "storage_data"),
                  storage_meta=_dec_storage_meta(md["storage_meta"], "storage_meta"),
                  version=_opt_str(md["version"], "version"))


def _no_constant(name: str) -> Any:
    """json's hook for NaN/Infinity: not JSON, and no field of the format is a float anyway."""
    raise MetadataRefused(f"contains {name}, which is not JSON")


def loads_json(data: bytes) -> Metadata:
    """Parse and `decode` a JSON document (strict: no NaN/Infinity, no trailing data, UTF-8)."""
    import json

    if data[:1] == pickle.PROTO:  # say so plainly: a pickle where the JSON index belongs is never unpickled
        raise MetadataRefused("is a pickle, not the JSON index (pickles are only read from a legacy .metadata)")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise MetadataRefused(f"is not valid JSON (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise MetadataRefused(f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise MetadataRefused("is not valid JSON (nested too deeply)") from None
    return decode(doc)


def dumps_json(metadata: Metadata) -> bytes:
    """`encode` as compact UTF-8 JSON (sorted keys: the same index always gives the same bytes)."""
    import json

    # Key order kept: entries stay in state-dict order (what `inspect` lists); the same index gives the same bytes.
    return json.dumps(encode(metadata), separators=(",", ":"), allow_nan=False).encode()


# --------------------------------------------------------------------------------- legacy pickled metadata

# The classes a genuine pickle instantiates (NEWOBJ + BUILD); nothing else may be created or given state.
_DATACLASSES = (Metadata, TensorStorageMetadata, BytesStorageMetadata, ChunkStorageMetadata, TensorProperties,
                StorageMeta, MetadataIndex, _StorageInfo)


def _layout_by_name(*args: Any) -> torch.layout:
    """Stands in for `torch.serialization._get_layout` (how torch pickles a layout): a fixed-name lookup."""
    names = {f"torch.{k}": v for k, v in LAYOUTS.items()}
    if len(args) != 1 or type(args[0]) is not str or args[0] not in names:
        raise MetadataRefused(f"calls torch.serialization._get_layout with {_short(args)}, not a layout name")
    return names[args[0]]


def _printable(text: Any) -> str:
    """A name from the file, safe to print on one line (no control characters reach the terminal)."""
    return text if type(text) is str and text.isprintable() and len(text) <= 200 else _short(text)


def _short(args: Any) -> str:
    text = " ".join(repr(args).split())
    return text if len(text) <= 120 else text[:117] + "..."


def _size(*args: Any) -> torch.Size:
    if len(args) != 1 or type(args[0]) is not tuple or any(type(v) is not int for v in args[0]):
        raise MetadataRefused(f"calls torch.Size with {_short(args)}, not a tuple of ints")
    return torch.Size(args[0])


def _mem_format(*args: Any) -> Any:
    if len(args) != 1 or type(args[0]) is not int or args[0] not in {m.value for m in _MemFormat}:
        raise MetadataRefused(f"calls {_MemFormat.__qualname__} with {_short(args)}, not one of its values")
    return _MemFormat(args[0])


_MD_MODULE = "torch.distributed.checkpoint.metadata"
# (module, name) -> what that global resolves to: exactly the globals a stock pickle refers to (Python 3.11-3.13
# pickle DCP's enum by value, so no `getattr`); `_get_layout` is replaced by a checking stand-in.
_GLOBALS: dict[tuple[str, str], Any] = {
    **{(_MD_MODULE, c.__name__): c for c in _DATACLASSES if c is not _StorageInfo},
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"): _StorageInfo,
    (_MD_MODULE, "_MEM_FORMAT_ENCODING"): _MemFormat,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): _layout_by_name,
    **{("torch", n): d for n, d in DTYPES.items()},
}
# What REDUCE may call: each either a checking stand-in or wrapped in one.
_CALLS: dict[Any, Callable[..., Any]] = {torch.Size: _size, _MemFormat: _mem_format,
                                         _layout_by_name: _layout_by_name}
# Opcodes of protocols 2-5 that build only containers, scalars and strings, plus the four that involve globals
# (checked below). INST/OBJ (old-protocol instantiation), NEWOBJ_EX, EXT*, PERSID and out-of-band buffers
# never occur in a DCP metadata pickle.
_SAFE_OPS = {name: getattr(pickle, name) for name in (
    "PROTO", "FRAME", "STOP", "MARK", "POP", "POP_MARK", "DUP", "NONE", "NEWTRUE", "NEWFALSE", "INT", "BININT",
    "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "TUPLE", "EMPTY_TUPLE", "TUPLE1", "TUPLE2",
    "TUPLE3", "EMPTY_LIST", "LIST", "APPEND", "APPENDS", "EMPTY_DICT", "DICT", "SETITEM", "SETITEMS", "EMPTY_SET",
    "ADDITEMS", "FROZENSET", "GET", "BINGET", "LONG_BINGET", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE", "GLOBAL",
    "STACK_GLOBAL", "REDUCE", "NEWOBJ", "BUILD") if hasattr(pickle, name)}
_OP_NAMES = {v[0]: k for k, v in vars(pickle).items() if k.isupper() and type(v) is bytes and len(v) == 1}


class _RefusingDispatch(dict):
    def __missing__(self, op: int) -> Callable[[Any], None]:
        name = _OP_NAMES.get(op, hex(op))
        raise MetadataRefused(f"uses the pickle opcode {name}, which a checkpoint may not contain")


class _StrictUnpickler(pickle._Unpickler):  # type: ignore[name-defined]  # the pure-Python one: opcodes overridable
    """Python's own unpickler with every opcode that could reach code replaced or removed.

    The C unpickler only lets `find_class` be restricted, but BUILD would still `setattr` on whatever is on the
    stack (a class included) and REDUCE would call any admitted global; here GLOBAL resolves only through
    `_GLOBALS` (exact names, no dotted attribute walks, nothing imported), REDUCE calls only `_CALLS`, NEWOBJ
    creates only the DCP dataclasses (with no arguments) and BUILD sets only their declared fields.
    """

    def find_class(self, module: str, name: str) -> Any:
        # Exact (module, name) pairs only: protocol 4 would otherwise resolve dotted names attribute by
        # attribute (`Metadata.__init__.__globals__`), and nothing is imported.
        found = _GLOBALS.get((module, name), _GLOBALS) if type(module) is str and type(name) is str else _GLOBALS
        if found is _GLOBALS:
            raise MetadataRefused(f"refers to {_printable(module)}.{_printable(name)}, which a checkpoint may not "
                                  "contain")
        return found

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        call = next((c for f, c in _CALLS.items() if f is func), None)  # identity: no __eq__ runs
        if call is None:
            raise MetadataRefused(f"calls {_describe(func)}, which a checkpoint may not do")
        if type(args) is not tuple:
            raise MetadataRefused(f"calls {_describe(func)} with {_tname(args)} arguments")
        self.stack[-1] = call(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        if not any(cls is c for c in _DATACLASSES) or type(args) is not tuple or len(args) != 0:
            raise MetadataRefused(f"creates {_describe(cls)} with {_short(args)}, which a checkpoint may not do")
        self.append(object.__new__(cls))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        cls = type(inst)
        if not any(cls is c for c in _DATACLASSES):
            raise MetadataRefused(f"sets the state of {_describe(inst)}, which a checkpoint may not do")
        if cls is TensorProperties:  # pickled through its own __getstate__: a 5-tuple with an enum
            if type(state) is not tuple or len(state) != 5 or type(state[3]) is not _MemFormat:
                raise MetadataRefused(f"gives TensorProperties the state {_short(state)}")
            TensorProperties.__setstate__(inst, state)  # the class's own function: only assigns fields
            return
        if type(state) is not dict:  # (a 2-tuple would also set attributes through setattr)
            raise MetadataRefused(f"gives {cls.__name__} a {_tname(state)} state, where DCP pickles a dict")
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = next((k for k in state if type(k) is not str or k not in fields), None)
        if bad is not None:
            raise MetadataRefused(f"gives {cls.__name__} the attribute {_short(bad)}, which is not one of its fields")
        vars(inst).update(state)

    dispatch = _RefusingDispatch({op[0]: pickle._Unpickler.dispatch[op[0]]  # type: ignore[attr-defined]
                                  for op in _SAFE_OPS.values()})
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.BUILD[0]] = load_build


def _describe(x: Any) -> str:
    if isinstance(x, type):
        return f"{x.__module__}.{x.__qualname__}"
    if callable(x) and hasattr(x, "__qualname__"):
        return f"{getattr(x, '__module__', '?')}.{x.__qualname__}"
    return f"a {type(x).__name__} object"


def unpickle_legacy(data: bytes) -> Metadata:
    """A stock `.metadata` pickle, read strictly and re-validated: the objects returned are rebuilt from the
    checked data by `decode`, never the unpickled ones themselves."""
    buf = io.BytesIO(data)
    try:
        obj = _StrictUnpickler(buf).load()
    except MetadataRefused:
        raise
    except RecursionError:
        raise MetadataRefused("is not a valid pickle (nested too deeply)") from None
    except Exception as e:  # noqa: BLE001 - truncated or malformed data raises many types; all mean "refused"
        raise MetadataRefused(f"is not a valid DCP metadata pickle ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:150]})") from None
    if buf.tell() != len(data):  # stock pickles end at STOP; anything after it was appended by someone else
        raise MetadataRefused(f"has {len(data) - buf.tell()} bytes after the end of the pickle")
    return decode(encode(obj))


__all__ = ["FORMAT", "FORMAT_VERSION", "MetadataRefused", "DTYPES", "LAYOUTS", "MEMORY_FORMATS", "encode", "decode",
           "loads_json", "dumps_json", "unpickle_legacy"]
