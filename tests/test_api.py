"""wrap/unwrap: the machinery is transparent with the empty preset, removable, and refuses bad input clearly."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import mmeff
import mmeff.presets
from mmeff.engine.method import Method, Point
from mmeff.families.prompt import make_inputs
from mmeff_lab.models.factory import FAMILIES, load_tiny, random_image
from tests.helpers import SIZES, batch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, tiny_model_dir):
    model, processor = load_tiny(tiny_model_dir(request.param), attn_implementation="sdpa")
    return request.param, model, processor


def _snapshot(model):
    return {
        name: (id(mod), type(mod), dict(mod._forward_hooks), dict(mod._forward_pre_hooks))
        for name, mod in model.named_modules()
    }


@torch.no_grad()
def test_none_is_transparent_and_unwrap_restores(family_model):
    family, model, processor = family_model
    inputs = batch(processor, family)
    attn = model.model.language_model.config._attn_implementation
    ref_logits = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    before = _snapshot(model)  # after a first forward: transformers adds its own output-capturing hooks lazily

    handle = mmeff.wrap(model, "none")
    assert model.model.language_model.config._attn_implementation != attn  # the machinery is really in the path
    out = model(**inputs).logits
    gen = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(out, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(gen, ref_gen)
    assert handle.stats["visual_tokens_in"] == handle.stats["visual_tokens_kept"] > 0

    mmeff.unwrap(model)
    assert _snapshot(model) == before
    assert model.model.language_model.config._attn_implementation == attn
    assert "get_image_features" not in vars(model.model)
    torch.testing.assert_close(model(**inputs).logits, ref_logits, rtol=0, atol=0)


class _Identity(Method):
    """Uses every in-layer hook with neutral values: proves each path is exact when it changes nothing."""

    points = frozenset({Point.LAYER})

    def attention_hooks(self, layer, state):
        class Neutral:
            def observe(self, call):
                call.received()

            def modify_scores(self, call, scores):
                return scores

        return [Neutral()]

    def head_scale(self, layer, state):
        return torch.ones(1, self.adapter.text_config.num_attention_heads)


@torch.no_grad()
def test_neutral_hooks_keep_outputs(family_model):
    from mmeff.methods.none import NoneConfig

    family, model, processor = family_model
    inputs = batch(processor, family)
    ref = model(**inputs).logits
    ref_gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    pipeline_cls = mmeff.api.Pipeline
    adapter = mmeff.families.adapter_for(model)
    pipe = pipeline_cls(model, adapter, [_Identity(NoneConfig(), adapter)])
    pipe.attach()
    try:
        out = model(**inputs).logits
        gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    finally:
        pipe.detach()
    real = inputs["attention_mask"].bool()  # padding rows are not defined outputs
    torch.testing.assert_close(out[real], ref[real], rtol=1e-4, atol=1e-5)
    assert torch.equal(gen, ref_gen)


def test_errors(family_model, tmp_path):
    family, model, processor = family_model
    with pytest.raises(mmeff.UnknownPresetError, match=r"valid presets: .*fastv.*none"):
        mmeff.wrap(model, "fastvv")
    with pytest.raises(mmeff.ConfigError, match="no field"):
        mmeff.wrap(model, "fastv", ratoi=0.3)
    with pytest.raises(mmeff.StageConflictError, match="twice"):
        mmeff.wrap(model, "fastv+fastv")
    with pytest.raises(mmeff.ConfigError, match="k must be"):
        mmeff.wrap(model, "fastv", k=99)
    with pytest.raises(mmeff.UnsupportedModelError, match="does not support Linear"):
        mmeff.wrap(torch.nn.Linear(2, 2), "none")
    mmeff.wrap(model, "none")
    try:
        with pytest.raises(mmeff.MmeffError, match="already wrapped"):
            mmeff.wrap(model, "none")
    finally:
        mmeff.unwrap(model)
    # one image placeholder expanded, but two images' pixels given
    inputs = batch(processor, family, multi_image=True)
    ids = inputs["input_ids"]
    image_ids = torch.tensor(mmeff.families.adapter_for(model).image_token_ids)
    first = int(torch.isin(ids[1], image_ids).nonzero()[0])
    ids[1, first] = processor.tokenizer.pad_token_id  # one image token fewer than the features need
    with mmeff.wrap(model, "fastv"), pytest.raises(mmeff.ImageTokenMismatchError, match="image tokens"):
        model(**inputs)


def test_stage_conflict_is_refused(family_model):
    _, model, _ = family_model

    class Cache1(Method):
        points = frozenset({Point.CACHE})

    adapter = mmeff.families.adapter_for(model)
    from mmeff.engine.pipeline import Pipeline
    from mmeff.methods.none import NoneConfig

    with pytest.raises(mmeff.StageConflictError, match="'cache' insertion point"):
        Pipeline(model, adapter, [Cache1(NoneConfig(), adapter), Cache1(mmeff.FastVConfig(), adapter)])


def test_presets_listing():
    names = mmeff.available_presets()
    assert {"none", "fastv"} <= set(names)


def test_preset_file(tmp_path, family_model):
    family, model, _ = family_model
    path = tmp_path / "mine.toml"
    path.write_text('[mine]\ndescription = "x"\nmethod = "fastv"\nk = 1\nratio = 0.25\n'
                    f'[mine.families.{family}]\nratio = 0.75\n')
    with mmeff.wrap(model, str(path)) as handle:
        assert handle.configs == [mmeff.FastVConfig(k=1, ratio=0.75)]


@torch.no_grad()
def test_suspended_runs_the_unwrapped_model(family_model):
    family, model, processor = family_model
    inputs = batch(processor, family)
    ref = model(**inputs).logits
    with mmeff.wrap(model, "fastv", k=1, timing=True) as handle:
        pruned = model(**inputs).logits
        stats = handle.stats
        with handle.pipeline.suspended():
            inner = model(**inputs).logits
        assert handle.stats == stats  # the suspended call leaves the wrapper's measurements alone
        assert stats["prefill_ms"] > 0 and stats["visual_tokens_kept"] < stats["visual_tokens_in"]
    torch.testing.assert_close(inner, ref, rtol=0, atol=0)
    assert not torch.allclose(pruned[:, -1], ref[:, -1])


@torch.no_grad()
def test_methods_see_an_attention_mask_when_generate_drops_it(family_model):
    """Unpadded batches: transformers' generate passes no attention_mask; the state and methods get all ones."""
    _, model, processor = family_model
    inputs = make_inputs(processor, ["describe the picture"], [[random_image(1, SIZES[0])]])
    seen = {}

    class Spy(Method):
        def begin(self, state, inputs):
            seen["mask"] = inputs.get("attention_mask")
            seen["state"] = state.attention_mask

    adapter = mmeff.families.adapter_for(model)
    pipe = mmeff.api.Pipeline(model, adapter, [Spy(mmeff.NoneConfig(), adapter)])
    pipe.attach()
    try:
        model.generate(input_ids=inputs["input_ids"], **{k: v for k, v in inputs.items() if k not in (
            "input_ids", "attention_mask")}, max_new_tokens=2, do_sample=False)
    finally:
        pipe.detach()
    assert torch.equal(seen["mask"], torch.ones_like(inputs["input_ids"]))
    assert torch.equal(seen["state"], seen["mask"])


@torch.no_grad()
def test_add_a_method_as_the_architecture_page_says(family_model, tmp_path):
    """docs/architecture.md "Add a method": its code block, run as written, registers a working method, and its
    preset table, written to a file, wraps a model with it."""
    from mmeff.engine import method as registry

    page = (Path(__file__).parents[1] / "docs" / "architecture.md").read_text()
    section = page[page.index("## Add a method"):page.index("## Add a family")]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    preset = textwrap.dedent(re.search(r"```toml\n(.*?)```", section, re.S).group(1))
    family, model, processor = family_model
    inputs = batch(processor, family)
    try:
        exec(compile(code, "docs/architecture.md", "exec"), {})
        (tmp_path / "keep-first-4.toml").write_text(preset)
        with mmeff.wrap(model, str(tmp_path / "keep-first-4.toml")) as handle:
            model(**inputs)
            st = handle.pipeline.state  # every sample holds more than 4 prunable visual tokens; 4 are left
            assert st.prunable_in_group(st.groups[0]).sum(1).min() > 4
            assert st.prunable_in_group(st.group).sum(1).tolist() == [4, 4]
            assert handle.stats["visual_tokens_kept"] < handle.stats["visual_tokens_in"]
    finally:
        registry._REGISTRY.pop("keep-first", None)


def test_preset_file_errors_name_the_file_and_the_section(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[mine]\ndescripton = "x"\nmethod = "fastv"\n')
    with pytest.raises(mmeff.ConfigError, match=r"bad\.toml: preset \[mine\] has a key 'descripton'; did you mean "
                                                 r"'description'\?"):
        mmeff.presets.resolve(str(path), None, {})
    path.write_text('[mine]\nmethod = "fastv"\nratoi = 0.5\n')
    with pytest.raises(mmeff.ConfigError, match=r"bad\.toml \[mine\]: .*ratoi"):
        mmeff.presets.resolve(str(path), None, {})
    path.write_text('[mine]\nmethod = "fastv"\nratio = \n')
    with pytest.raises(mmeff.ConfigError, match=r"bad\.toml: not valid TOML"):
        mmeff.presets.resolve(str(path), None, {})


def test_import_is_lazy():
    """``import mmeff`` (and so the command line's --help) loads neither torch nor transformers."""
    code = ("import sys, mmeff, mmeff.presets; mmeff.presets.builtin_presets(); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'eager import'; "
            "assert callable(mmeff.wrap) and 'torch' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        mmeff.nosuch  # noqa: B018
    code = "import mmeff; print(mmeff.families.adapter_for.__name__)"  # subpackages without importing them first
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0 and out.stdout.strip() == "adapter_for", out.stderr[-2000:]


def test_untested_transformers_is_refused(monkeypatch):
    from mmeff.api import check_transformers

    for ok in ("5.17.0", "5.25.0", "5.40.0.dev0"):
        check_transformers(ok)
    for bad in ("4.57.1", "5.16.2", "6.0.0"):
        with pytest.raises(mmeff.MmeffError, match=rf"transformers {re.escape(bad)} is untested.*<6"):
            check_transformers(bad)
    monkeypatch.setenv("MMEFF_ALLOW_UNTESTED_TRANSFORMERS", "1")
    check_transformers("6.0.0")
