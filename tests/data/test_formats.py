"""T5 / encoder formats, label words, STS-B rounding, tokenisation, CLIP prompts."""

import numpy as np
import pytest

from llora_jax import data


def cols(**kv):
    return {
        k: np.asarray(v, dtype=object if isinstance(v[0], str) else None) for k, v in kv.items()
    }


def test_t5_prompts_and_label_words_of_every_glue_task():
    ex = {
        "cola": cols(sentence=["S"], label=[0]),
        "sst2": cols(sentence=["S"], label=[1]),
        "mnli": cols(premise=["P", "P", "P"], hypothesis=["H", "H", "H"], label=[0, 1, 2]),
        "mrpc": cols(sentence1=["A"], sentence2=["B"], label=[0]),
        "qqp": cols(question1=["A"], question2=["B"], label=[1]),
        "rte": cols(sentence1=["A"], sentence2=["B"], label=[1]),
        "stsb": cols(sentence1=["A"], sentence2=["B"], label=[3.8]),
        "qnli": cols(question=["Q"], sentence=["S"], label=[0]),
    }
    want = {
        "cola": (["cola sentence: S"], ["unacceptable"]),
        "sst2": (["sst2 sentence: S"], ["positive"]),
        "mnli": (["mnli hypothesis: H premise: P"] * 3, ["entailment", "neutral", "contradiction"]),
        "mrpc": (["mrpc sentence1: A sentence2: B"], ["not_equivalent"]),
        "qqp": (["qqp question1: A question2: B"], ["duplicate"]),
        "rte": (["rte sentence1: A sentence2: B"], ["not_entailment"]),
        "stsb": (["stsb sentence1: A sentence2: B"], ["3.8"]),
        "qnli": (["qnli question: Q sentence: S"], ["entailment"]),
    }
    for name, e in ex.items():
        assert data.t5_format(name, e) == want[name], name
    assert data.GLUE_TASKS == ("cola", "mnli", "mrpc", "qqp", "rte", "sst2", "stsb")
    assert data.get_task("glue/sst2") is data.get_task("SST-2")


def test_stsb_targets_on_the_point_two_grid():
    scores = np.array([0.0, 0.1, 0.3, 2.5, 3.8, 4.9, 5.0], np.float32)
    # float32 arithmetic, round half to even (tf.round): 0.5 -> 0, 12.5 -> 12, 24.5 -> 24
    assert data.t5_targets("stsb", scores) == ["0.0", "0.0", "0.4", "2.4", "3.8", "4.8", "5.0"]
    # every target parses back onto the grid
    targets = data.t5_targets("stsb", np.random.default_rng(0).uniform(0, 5, 100))
    vals = np.array([float(t) for t in targets])
    np.testing.assert_allclose(vals * 5, np.round(vals * 5), atol=1e-9)


def test_label_outside_label_words_is_refused():
    with pytest.raises(ValueError, match="label 2 outside 0..1"):
        data.t5_targets("rte", [0, 2])


def test_encoder_format_order_and_dtypes():
    e = cols(premise=["P"], hypothesis=["H"], label=[2])
    out = data.encoder_format("mnli", e)
    assert out["text_a"] == ["P"] and out["text_b"] == ["H"] and out["label"].dtype == np.int64
    s = data.encoder_format("stsb", cols(sentence1=["a"], sentence2=["b"], label=[3.3]))
    assert s["label"].dtype == np.float32 and s["label"][0] == pytest.approx(3.3)  # unrounded
    assert data.encoder_format("cola", cols(sentence=["x"], label=[1]))["text_b"] is None
    with pytest.raises(KeyError, match="missing"):
        data.encoder_format("mrpc", cols(sentence1=["a"], label=[1]))


def test_tokenize_with_a_plain_callable():
    vocab = {}

    def tok(a, b=None):
        words = a.split() + ([] if b is None else ["|"] + b.split())
        return [vocab.setdefault(w, len(vocab) + 2) for w in words]

    out = data.tokenize(tok, ["a b c", "d"], text_pair=["x y", "z"], max_length=5, pad_id=1)
    assert out["input_ids"].dtype == np.int32 and out["input_ids"].shape == (2, 5)
    np.testing.assert_array_equal(out["attention_mask"], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert out["input_ids"][1, 3:].tolist() == [1, 1]
    assert out["input_ids"][0].tolist() == [vocab[w] for w in "a b c | x".split()]  # truncated


def test_t5_arrays_with_an_hf_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "cola", "sentence", ":", "good", "bad"]
    words += ["acceptable", "unacceptable", "un", "##acceptable"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    ex = cols(sentence=["good", "bad bad bad bad bad bad"], label=[1, 0])
    out = data.t5_arrays("cola", ex, tok, max_length=6, max_target_length=4)
    assert out["input_ids"].shape == (2, 6) and out["labels"].shape == (2, 4)
    ref = tok(["cola sentence: good"], max_length=6, padding="max_length", truncation=True)
    assert out["input_ids"][0].tolist() == ref["input_ids"][0]
    assert out["attention_mask"][1].tolist() == [1] * 6  # truncated to max_length
    assert out["decoder_attention_mask"].sum(1).tolist() == [3, 3]  # [CLS] word [SEP]
    assert out["label"].tolist() == [1, 0]
    enc = data.encoder_arrays("cola", ex, tok, max_length=5)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids", "label"}


def test_clip_templates_and_prompts():
    for name in data.VISION_TASKS:
        ts = data.templates(name)
        assert ts and all("{c}" in t for t in ts)
        assert data.templates(name, ensemble=False) == ("a photo of a {c}.",)
        assert data.get_task(name).templates == ts
    assert len(data.templates("resisc45")) == 18 and len(data.templates("dtd")) == 8
    assert "satellite imagery of {c}." in data.templates("resisc45")
    p = data.prompts(["cat", "dog"], ["a photo of a {c}.", "a {c}!"])
    assert p == [["a photo of a cat.", "a cat!"], ["a photo of a dog.", "a dog!"]]
    assert data.class_names("gtsrb")[14] == "stop" and len(data.class_names("gtsrb")) == 43


def test_image_transform_resize_crop_and_normalize():
    img = np.zeros((10, 20, 1), np.uint8)
    img[:, 5:15] = 200  # a bright centre band that survives the centre crop
    out = data.image_transform(10)({"image": [img], "label": np.array([0])})
    assert out["image"].shape == (1, 10, 10, 3) and out["image"].dtype == np.uint8
    np.testing.assert_array_equal(out["image"][0, :, :, 0], img[:, 5:15, 0])
    same = np.full((2, 4, 4, 3), 255, np.uint8)
    assert data.image_transform(4)({"image": same})["image"] is same  # no copy when sized
    x = data.image_transform(4, normalized=True)({"image": same})["image"]
    np.testing.assert_allclose(
        x[0, 0, 0], (1 - np.array(data.CLIP_MEAN)) / np.array(data.CLIP_STD), rtol=1e-6
    )


def test_preprocess_on_device_matches_pil_within_one_level():
    import functools

    import jax
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    for shape, size in [((2, 32, 32, 3), 56), ((2, 40, 30, 1), 24)]:
        imgs = gaussian_filter(rng.random(shape) * 255, (0, 1.5, 1.5, 0)).astype(np.uint8)
        ref = data.image_transform(size)({"image": imgs})["image"]
        raw = functools.partial(data.preprocess_on_device, size=size, normalized=False)
        both = jax.jit(lambda x, raw=raw, size=size: (raw(x), data.preprocess_on_device(x, size)))
        out, norm = map(np.asarray, both(imgs))
        assert out.shape == norm.shape == (2, size, size, 3)
        assert np.abs(out - ref.astype(np.float32)).max() <= 1.0
        np.testing.assert_allclose(norm, data.normalize(out.astype(np.uint8)), atol=1e-5)
