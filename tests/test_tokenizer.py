"""jaxvid.tokenizer against transformers' T5Tokenizer on a sentencepiece model trained on the fly."""
from __future__ import annotations

import html
import io
import json
import re
import shutil

import numpy as np
import pytest
import sentencepiece
from transformers import AutoTokenizer, T5Tokenizer

from jaxvid.tokenizer import (
    COGVIDEOX_MAX_LENGTH,
    LONGCAT_MAX_LENGTH,
    TextTokenizer,
    cogvideox_tokenizer,
    longcat_tokenizer,
    prompt_clean,
)

CORPUS = [
    "A panda, dressed in a small red jacket and a tiny hat, sits on a wooden stool in a serene bamboo forest.",
    "The camera follows behind a white vintage SUV with a black roof rack as it speeds up a steep dirt road.",
    "A street artist, clad in a worn-out denim jacket and a colorful bandana, stands before a vast concrete wall.",
    "Golden light washes over the mountains while clouds drift slowly across the valley at sunrise.",
    "Two dogs play in the snow; children laugh and throw snowballs near a frozen lake.",
]
PROMPTS = [
    "A panda sits on a stool.",
    CORPUS[1] + " " + CORPUS[2],  # longer than the short max length: truncation
    "  leading   and trailing\tspaces\n ",
    "",
    "Unknown characters: 猫 é ß ~ {}",
    "ｆｕｌｌｗｉｄｔｈ letters ①",
    "special tokens <extra_id_0> inside </s> the text<pad>",
]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tokenizer folders as checkpoints ship them: spiece.model + tokenizer_config.json, and tokenizer.json only."""
    root = tmp_path_factory.mktemp("tok")
    model = io.BytesIO()
    # T5's id layout: <pad>=0, </s>=1, <unk>=2, no <s>
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=model, vocab_size=100, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, minloglevel=2,
    )
    source = root / "source"
    source.mkdir()
    (source / "spiece.model").write_bytes(model.getvalue())
    saved = root / "saved"
    T5Tokenizer.from_pretrained(source).save_pretrained(saved)

    spiece_folder = root / "spiece"  # CogVideoX's layout (spiece.model, tokenizer_config.json)
    spiece_folder.mkdir()
    shutil.copy(source / "spiece.model", spiece_folder)
    shutil.copy(saved / "tokenizer_config.json", spiece_folder)
    json_folder = root / "json"  # a tokenizer.json-only layout
    shutil.copytree(saved, json_folder)
    legacy_folder = root / "legacy"  # older transformers: ids of the added tokens in added_tokens_decoder
    legacy_folder.mkdir()
    shutil.copy(source / "spiece.model", legacy_folder)
    specials = {0: "<pad>", 1: "</s>", 2: "<unk>", **{100 + 99 - i: f"<extra_id_{i}>" for i in range(100)}}
    config = {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "eos_token": "</s>", "pad_token": "<pad>",
              "unk_token": "<unk>", "model_max_length": 512, "legacy": True,
              "added_tokens_decoder": {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                                "single_word": False, "special": True} for i, c in specials.items()}}
    (legacy_folder / "tokenizer_config.json").write_text(json.dumps(config))
    return {"spiece": spiece_folder, "json": json_folder, "legacy": legacy_folder}


def _reference(folder, prompts, max_length):
    tok = AutoTokenizer.from_pretrained(folder)
    out = tok(prompts, padding="max_length", max_length=max_length, truncation=True, add_special_tokens=True,
              return_attention_mask=True)
    return np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])


@pytest.mark.parametrize("layout", ["spiece", "json", "legacy"])
@pytest.mark.parametrize("max_length", [12, COGVIDEOX_MAX_LENGTH])
def test_ids_and_mask_equal_transformers(folders, layout, max_length):
    ours = TextTokenizer.from_folder(folders[layout], max_length=max_length)(PROMPTS)
    ref_ids, ref_mask = _reference(folders[layout], PROMPTS, max_length)
    assert ours.input_ids.dtype == np.int32 and ours.attention_mask.dtype == np.int32
    assert ours.input_ids.shape == (len(PROMPTS), max_length)
    np.testing.assert_array_equal(ours.input_ids, ref_ids)
    np.testing.assert_array_equal(ours.attention_mask, ref_mask)
    if max_length == 12:
        assert ours.attention_mask[1].all()  # the long prompt was cut, then closed with </s>
        assert ours.input_ids[1, -1] == 1


def test_cogvideox_tokenizer_is_226_tokens_of_the_raw_prompt(folders):
    tok = cogvideox_tokenizer(folders["spiece"])
    out = tok("  A panda sits on a stool.  ")
    assert out.input_ids.shape == (1, COGVIDEOX_MAX_LENGTH)
    ref_ids, ref_mask = _reference(folders["spiece"], ["  A panda sits on a stool.  "], COGVIDEOX_MAX_LENGTH)
    np.testing.assert_array_equal(out.input_ids, ref_ids)
    np.testing.assert_array_equal(out.attention_mask, ref_mask)


def _upstream_prompt_clean(text):
    # LongCat-Video's basic_clean + whitespace_clean, written out as upstream does them
    ftfy = pytest.importorskip("ftfy")
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


@pytest.mark.parametrize(
    "prompt",
    ["  A  cat &amp;amp; a dog\n\tplay  ", "caf&eacute; &lt;b&gt;bold&lt;/b&gt;", "mojibake: cafÃ©", "plain prompt"],
)
def test_prompt_clean_matches_upstream(prompt):
    assert prompt_clean(prompt) == _upstream_prompt_clean(prompt)


def test_longcat_tokenizer_cleans_then_pads_to_512(folders):
    prompts = ["  Two dogs &amp; children\n play in   the snow. ", "A panda sits on a stool."]
    out = longcat_tokenizer(folders["spiece"])(prompts)
    ref_ids, ref_mask = _reference(folders["spiece"], [prompt_clean(p) for p in prompts], LONGCAT_MAX_LENGTH)
    assert out.input_ids.shape == (2, LONGCAT_MAX_LENGTH)
    np.testing.assert_array_equal(out.input_ids, ref_ids)
    np.testing.assert_array_equal(out.attention_mask, ref_mask)


def test_bad_arguments_raise(folders, tmp_path):
    with pytest.raises(ValueError, match="tokenizer path"):
        TextTokenizer.from_folder(tmp_path / "missing", max_length=8)
    with pytest.raises(ValueError, match="neither spiece.model nor tokenizer.json"):
        TextTokenizer.from_folder(tmp_path, max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        TextTokenizer.from_folder(folders["spiece"], max_length=1)
    tok = TextTokenizer.from_folder(folders["spiece"], max_length=8)
    with pytest.raises(ValueError, match="prompts"):
        tok([1, 2])
    with pytest.raises(ValueError, match="prompts"):
        tok([])


def test_tiny_tokenizer_json_loads_in_transformers_with_the_spiece_ids(tmp_path):
    """bench/e2e.py writes tokenizer.json for diffusers' side: transformers reads it alone (no
    spiece.model to convert) and gives the ids transformers gives from spiece.model."""
    from jaxvid.synthetic.cogvideox import _tokenizer_config, tiny_spiece_model, write_tokenizer_json

    spm_dir, json_dir = tmp_path / "spm", tmp_path / "json"
    for d in (spm_dir, json_dir):
        d.mkdir()
        (d / "spiece.model").write_bytes(tiny_spiece_model())
        (d / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config()))
    write_tokenizer_json(json_dir)
    (json_dir / "spiece.model").unlink()
    prompt = "A panda, dressed in a small red jacket <extra_id_0> plays </s> by the lake."
    ref = T5Tokenizer.from_pretrained(spm_dir, legacy=True)(prompt).input_ids
    assert T5Tokenizer.from_pretrained(json_dir)(prompt).input_ids == ref
