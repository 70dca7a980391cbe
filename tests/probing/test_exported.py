"""service.probing.exported: archive inspection (zipfile only), the pickle-free loader, the dry run."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from service.probing import exported
from service.probing.exported import ArchiveError, dry_run, inspect_archive, load_program
from service.probing.spec import ProbeSpec
from tests import exported_models as em


def _code(excinfo: pytest.ExceptionInfo[ArchiveError]) -> str:
    return excinfo.value.code


def test_a_real_export_archive_passes_inspection() -> None:
    summary = inspect_archive(em.cnn_archive())
    assert summary["weights"] >= 6 and summary["constants"] == 0


def test_inspection_runs_without_importing_torch() -> None:
    """The service process inspects uploads; that path must not pull torch into it."""
    code = (
        "import sys\n"
        "from service.probing.exported import inspect_archive\n"
        f"inspect_archive({str(em.cnn_archive())!r})\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_inspection_refuses_files_that_are_not_export_archives(tmp_path: Path) -> None:
    not_zip = tmp_path / "model.pt2"
    not_zip.write_bytes(b"definitely not a zip")
    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(not_zip)
    assert _code(excinfo) == "not_a_zip"

    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(em.zip_without_export_layout(tmp_path / "layout.pt2"))
    assert _code(excinfo) in {"not_an_export_archive", "unsupported_archive_content"}
    assert "torch.export" in excinfo.value.message

    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(em.cnn_archive(), max_uncompressed_bytes=1000)
    assert _code(excinfo) == "archive_too_large"


def test_a_weight_stored_as_a_pickle_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    archive = em.pickled_weight_archive(marker, tmp_path / "evil.pt2")
    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(archive)
    assert _code(excinfo) == "pickled_content" and "use_pickle" in excinfo.value.message
    with pytest.raises(ArchiveError):
        load_program(str(archive))  # the probe-side loader inspects again before torch reads a byte
    assert not marker.exists()


def test_the_crafted_pickle_is_real_torch_export_load_would_run_it(tmp_path: Path) -> None:
    """Sanity check of the marker mechanism: the archive above is dangerous with torch's own loader."""
    marker = tmp_path / "unpickled.marker"
    archive = em.pickled_weight_archive(marker, tmp_path / "evil.pt2")
    # The open file object is not a tensor, so torch fails after unpickling with an error of its own.
    with pytest.raises(Exception):  # noqa: B017, PT011
        torch.export.load(archive)
    assert marker.exists()


def test_sample_inputs_are_never_read_by_our_loader(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled.marker"
    archive = em.pickled_sample_inputs_archive(marker, tmp_path / "evil-inputs.pt2")
    inspect_archive(archive)  # clean weights: accepted
    program = load_program(str(archive))
    assert program.module()(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert not marker.exists()


def test_other_pickled_or_compiled_payloads_are_refused(tmp_path: Path) -> None:
    source = em.cnn_archive()
    with zipfile.ZipFile(source) as archive:
        root = archive.namelist()[0].split("/", 1)[0]
        constants = json.loads(archive.read(f"{root}/data/constants/model_constants_config.json"))
    constants["config"]["obj"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": False}
    cases = {
        "legacy.pt2": ({"data/weights/model.pt": b"pickle"}, "pickled_content"),
        "object.pt2": (
            {
                "data/constants/model_constants_config.json": json.dumps(constants).encode(),
                "data/constants/custom_obj_0": b"pickle",
            },
            "pickled_content",
        ),
        "aoti.pt2": ({"data/aotinductor/model/model.so": b"\x7fELF"}, "unsupported_archive_content"),
    }
    for name, (extra, code) in cases.items():
        target = tmp_path / name
        with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
            for info in src.infolist():
                relative = info.filename.split("/", 1)[1]
                dst.writestr(info, extra.pop(relative, src.read(info)))
            for relative, payload in extra.items():
                dst.writestr(f"{root}/{relative}", payload)
        with pytest.raises(ArchiveError) as excinfo:
            inspect_archive(target)
        assert _code(excinfo) == code, name


def test_a_torch_whose_loader_internals_changed_is_refused_as_unsupported_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each way a private torch API can move: gone (ImportError), renamed (AttributeError), new signature."""
    from torch._export.serde import schema
    from torch.export.pt2_archive import _package

    def _load_state_dict(archive_reader: object) -> dict:  # one argument fewer than torch's
        raise AssertionError("called despite the signature mismatch")

    changes = [
        lambda m: m.delattr(_package, "_load_constants"),
        lambda m: m.delattr(schema, "ExportedProgram"),
        lambda m: m.setattr(_package, "_load_state_dict", _load_state_dict),
    ]
    for change in changes:
        with monkeypatch.context() as m:
            change(m)
            with pytest.raises(ArchiveError) as excinfo:
                load_program.__wrapped__(str(em.cnn_archive()))
        assert _code(excinfo) == "unsupported_torch"
        assert "cannot load export archives" in excinfo.value.message
    assert "_load_state_dict" in excinfo.value.message  # names what changed


def test_dry_run_infers_a_classifier_task_from_the_program() -> None:
    result = dry_run(str(em.cnn_archive()), {"loss": "cross_entropy"})
    config = result["config"]
    assert config["input_shape"] == [1, 8, 8] and config["input_dtype"] == "float32"
    assert config["target_shape"] == [] and config["target_high"] == 10
    assert set(result["losses"]) == {"1", "2", "3"}
    assert result["batch"]["dynamic"] is True
    assert result["parameters"] == sum(p.numel() for p in em.TinyCNN().parameters())


def test_dry_run_of_a_model_that_returns_its_own_loss() -> None:
    result = dry_run(str(em.transformer_archive()), {"loss": "model_returns_loss", "num_classes": 256})
    config = result["config"]
    assert config["input_shape"] == [16] and config["input_dtype"] == "int64" and config["input_high"] == 256
    assert config["target_shape"] == [16] and config["target_high"] == 256


def test_dry_run_refusals_name_the_problem() -> None:
    with pytest.raises(ArchiveError) as excinfo:
        dry_run(str(em.static_archive()), {"loss": "cross_entropy"})
    assert _code(excinfo) == "static_batch_dimension" and "static" in excinfo.value.message

    with pytest.raises(ArchiveError) as excinfo:
        dry_run(str(em.nan_archive()), {"loss": "cross_entropy"})
    assert _code(excinfo) == "dry_run_failed" and "nan" in excinfo.value.message

    with pytest.raises(ArchiveError) as excinfo:
        dry_run(str(em.cnn_archive()), {"loss": "cross_entropy", "input": {"shape": [3, 8, 8]}})
    assert _code(excinfo) == "input_shape_mismatch"

    with pytest.raises(ArchiveError) as excinfo:
        dry_run(str(em.cnn_archive()), {"loss": "model_returns_loss"})
    assert _code(excinfo) == "unsupported_inputs"

    with pytest.raises(ArchiveError) as excinfo:  # integer targets need their range
        dry_run(str(em.transformer_archive()), {"loss": "model_returns_loss"})
    assert _code(excinfo) == "invalid_model_spec"


def test_the_probe_engine_trains_an_exported_model_in_process() -> None:
    from service.probing.engine import run_probe

    config = dry_run(str(em.transformer_archive()), {"loss": "model_returns_loss", "num_classes": 256})[
        "config"
    ]
    spec = ProbeSpec(
        model_name="artifact:transformer",
        model_config=config,
        model_artifact_path=str(em.transformer_archive()),
        optimizer="adamw",
        learning_rate=1e-3,
        memory_budget_bytes=16 * 2**20,
        time_budget_s=3,
        dataset_size=2048,
    )
    events: list[dict] = []
    result = run_probe(spec, events.append)
    assert 1 <= result["max_feasible_batch_size"] <= 2048
    assert result["throughput"] and result["recommended_batch_size"] >= 1
    fitted = [
        e for e in events if e.get("event") == "trial" and e["phase"] == "memory" and e["outcome"] == "ok"
    ]
    assert all(e["peak_bytes"] <= spec.memory_budget_bytes for e in fitted)
    # Each build is a fresh copy: training it left the archive's cached program untouched.
    program = exported.load_program(str(em.transformer_archive()))
    fresh = exported.load_program.__wrapped__(str(em.transformer_archive()))
    for (name, a), (_, b) in zip(program.state_dict.items(), fresh.state_dict.items(), strict=True):
        assert torch.equal(a, b), name


# --------------------------------------------------------------------------------------------------
# Nothing in the program's JSON is evaluated


def test_the_sympy_payload_is_live_sympify_would_run_it(tmp_path: Path) -> None:
    """Sanity check of the marker mechanism: torch's deserializer hands expr_str to sympy.sympify."""
    import sympy

    marker = tmp_path / "sympified.marker"
    sympy.sympify(f"Symbol('s77', positive=True, integer=True) + {em.sympy_payload(marker)}")
    assert marker.exists()


def test_a_symbolic_size_carrying_python_is_refused_before_torch_reads_it(tmp_path: Path) -> None:
    marker = tmp_path / "sympified.marker"
    archive = em.sympy_injection_archive(marker, tmp_path / "evil.pt2")
    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(archive)
    assert _code(excinfo) == "unsafe_archive_content"
    assert "models/model.json" in excinfo.value.message and "__import__" in excinfo.value.message
    with pytest.raises(ArchiveError) as excinfo:
        load_program.__wrapped__(str(archive))  # the probe-side loader checks the same bytes again
    assert _code(excinfo) == "unsafe_archive_content"
    with pytest.raises(ArchiveError):
        dry_run(str(archive), {"loss": "cross_entropy"})
    assert not marker.exists()


def _first_node(program: dict) -> dict:
    return program["graph_module"]["graph"]["nodes"][0]


def _set_spec(program: dict, spec: list) -> None:
    program["graph_module"]["module_call_graph"][0]["signature"]["in_spec"] = json.dumps(spec)


ENUM_CONTEXT = json.dumps([{"__enum__": True, "fqn": "os:environ", "name": "PATH"}])
HOSTILE_PROGRAMS = {
    # node targets are looked up on torch (torch.os is the os module) and called
    "target": lambda p: _first_node(p).update(target="torch.os.system"),
    "custom op": lambda p: _first_node(p).update(target="torch.ops.mylib.evil.default"),
    "file op": lambda p: _first_node(p).update(target="torch.ops.aten.from_file.default"),
    # names end up in generated Python source
    "name": lambda p: _first_node(p).update(name="x'); __import__('os').system('true'); ('"),
    "kwarg name": lambda p: _first_node(p)["inputs"][0].update(name='a=__import__("os")'),
    "key": lambda p: p["graph_module"]["graph"]["tensor_values"].update({"a b": {}}),
    "stack trace": lambda p: _first_node(p)["metadata"].update(stack_trace='File "x\rimport os", line 1'),
    "range": lambda p: p["range_constraints"].update({"s0) or (1": {"min_val": 2, "max_val": 4}}),
    # tree specs: only the containers torch.export writes, contexts without objects
    "spec type": lambda p: _set_spec(p, [1, {"type": "os.system", "context": "null", "children_spec": []}]),
    "spec enum": lambda p: _set_spec(
        p, [1, {"type": "builtins.dict", "context": ENUM_CONTEXT, "children_spec": []}]
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PROGRAMS))
def test_strings_that_would_reach_an_evaluator_are_refused(case: str, tmp_path: Path) -> None:
    archive = em.rewritten_program_archive(tmp_path / "hostile.pt2", HOSTILE_PROGRAMS[case])
    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(archive)
    assert _code(excinfo) == "unsafe_archive_content", excinfo.value.message
    assert excinfo.value.message.startswith("models/model.json: ")


EXPRESSIONS_TORCH_WRITES = [
    "Symbol('s77', positive=True, integer=True)",
    "Mul(Integer(16), Symbol('s95', positive=True, integer=True))",
    "FloorDiv(Add(Symbol('s0', positive=True, integer=True), Integer(3)), Integer(4))",
    "Max(Integer(2), Symbol('s0', positive=True, integer=True))",
    "ModularIndexing(Symbol('s0', positive=True, integer=True), Integer(2), Integer(4))",
    "Equality(Symbol('s0', positive=True, integer=True), Integer(2))",
    "And(StrictGreaterThan(Symbol('s1'), Integer(2)), StrictLessThan(Symbol('s0'), Integer(5)))",
    "Mul(Float('1.5', precision=53), Symbol('zf0', real=True))",
    "Pow(ToFloat(Symbol('s0', positive=True, integer=True)), Rational(1, 2))",
    "PowByNatural(Integer(2), Symbol('s0', positive=True, integer=True))",
    "Where(StrictGreaterThan(Symbol('s0'), Integer(1)), Symbol('s0'), Integer(1))",
    "-int_oo",
    "true",
    "s0 + 2*s1 - (s2//4)",  # the str() form older torch versions wrote
]
EXPRESSIONS_REFUSED = [
    "Symbol('s0') + 0*__import__('os').system('true')",
    "s0.__class__",
    "Symbol('s0')[0]",
    "exec('1')",
    "Mul('s0 + 1', Integer(2))",  # strings are sympified again by sympy
    "Symbol('a b')",
    "lambda: 1",
    "Pow(Integer(10), Integer(10**9))",
    "Pow(Integer(10), Integer(1000000000))",
    "2 ** (16*16)",
    "Pow(Pow(Pow(Pow(Integer(2), Integer(2)), Integer(2)), Integer(2)), Integer(2))",
    "Integer(" + "9" * 100 + ")",
    "(" * 200 + "s0" + ")" * 200,
]


def test_the_expression_grammar_takes_what_torch_writes_and_nothing_that_runs() -> None:
    import sympy

    for text in EXPRESSIONS_TORCH_WRITES:
        exported.check_sympy_expression(text)
        sympy.sympify(text, locals={"int_oo": sympy.oo})  # and it is valid sympy
    for text in EXPRESSIONS_REFUSED:
        with pytest.raises(exported.archive._Unsafe):
            exported.check_sympy_expression(text)


def test_every_expression_in_real_exports_passes_the_grammar() -> None:
    for archive in (em.cnn_archive(), em.transformer_archive(), em.reshaping_archive()):
        with zipfile.ZipFile(archive) as zf:
            raw = next(zf.read(n) for n in zf.namelist() if n.endswith("models/model.json"))
        exported.check_program_json(raw, "models/model.json")
        assert b"expr_str" in raw
    program = load_program(str(em.reshaping_archive()))
    assert program.module()(torch.randn(3, 12)).shape == (3, 6)


def test_deeply_nested_json_in_an_archive_is_refused_not_a_recursion_error(tmp_path: Path) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    config = f'{{"config": {{}}, "extra": {nested}}}'.encode()
    archive = em._rewrite(
        em.cnn_archive(), tmp_path / "deep.pt2", {"data/weights/model_weights_config.json": config}
    )
    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(archive)
    assert _code(excinfo) == "not_an_export_archive" and "deeper" in excinfo.value.message


def test_strings_in_the_weights_config_are_checked_too(tmp_path: Path) -> None:
    with zipfile.ZipFile(em.cnn_archive()) as archive:
        name = next(n for n in archive.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(archive.read(name))
    first = next(iter(config["config"]))
    config["config"]['x"); __import__("os").system("true"); ("'] = config["config"].pop(first)
    hostile = em._rewrite(
        em.cnn_archive(),
        tmp_path / "weights.pt2",
        {"data/weights/model_weights_config.json": json.dumps(config).encode()},
    )
    with pytest.raises(ArchiveError) as excinfo:
        inspect_archive(hostile)
    assert _code(excinfo) == "unsafe_archive_content"
    assert excinfo.value.message.startswith("data/weights/model_weights_config.json: ")
