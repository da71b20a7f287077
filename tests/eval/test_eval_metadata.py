from __future__ import annotations

import pytest

from clipforge.eval.metadata import fill_template, load_classnames, load_templates


def test_builtin_names_and_templates():
    assert len(load_classnames("imagenet")) == 1000
    c10, c100 = load_classnames("cifar10"), load_classnames("CIFAR100")
    assert len(c10) == len(set(c10)) == 10 and c10[0] == "airplane" and c10[-1] == "truck"
    assert (
        len(c100) == len(set(c100)) == 100 and c100[:2] == ["apple", "aquarium fish"] and c100[-1] == "worm"
    )
    assert c100 == sorted(c100)  # CIFAR-100's label order is alphabetical
    assert len(load_templates("openai")) == 80 and len(load_templates("simple")) == 7
    assert fill_template(load_templates("openai")[0], "dog") == "a bad photo of a dog."


def test_files(tmp_path):
    (tmp_path / "n.txt").write_text("# my classes\ncat\n\ngolden retriever\n")
    assert load_classnames(tmp_path / "n.txt") == ["cat", "golden retriever"]
    (tmp_path / "t.txt").write_text("a photo of a {}.\nart of the {c}.\n")
    assert [fill_template(t, "cat") for t in load_templates(str(tmp_path / "t.txt"))] == [
        "a photo of a cat.",
        "art of the cat.",
    ]


def test_a_names_file_from_a_windows_editor_reads_the_same(tmp_path):
    # a byte-order mark and CRLF line ends: the BOM stayed in the first name ("\ufeffcat"), which then
    # matched no class folder and went into every prompt
    (tmp_path / "n.txt").write_bytes("cat\r\ngolden retriever\r\n".encode("utf-8-sig"))
    assert load_classnames(tmp_path / "n.txt") == ["cat", "golden retriever"]
    (tmp_path / "t.txt").write_bytes("a photo of a {}.\r\n".encode("utf-8-sig"))
    assert load_templates(tmp_path / "t.txt") == ["a photo of a {}."]


def test_bad_inputs_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in name nor a readable file"):
        load_classnames("imagenet21k")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="is empty"):
        load_classnames(tmp_path / "empty.txt")
    (tmp_path / "t.txt").write_text("a photo\n")
    with pytest.raises(ValueError, match="has no '\\{\\}'"):
        load_templates(tmp_path / "t.txt")


@pytest.mark.parametrize(
    "template", ["a {} next to a {}.", "a photo of a {} by {artist}.", "a {} {", "{0} and {}"]
)
def test_a_template_that_cannot_be_filled_is_named_when_read(tmp_path, template):
    # each has a '{}' but str.format fails on it; this used to surface as a bare IndexError/KeyError
    # from inside the classifier build
    (tmp_path / "t.txt").write_text(f"a photo of a {{}}.\n{template}\n")
    with pytest.raises(ValueError, match=r"prompt template .* cannot be filled .*literal brace"):
        load_templates(tmp_path / "t.txt")
    assert load_templates(["a {} with {{braces}}."]) == ["a {} with {{braces}}."]
