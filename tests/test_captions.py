import pytest

from indexer.errors import BadFileError
from indexer.sources.captions import read_captions


def write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_csv_with_bom_id_and_image_columns(tmp_path):
    path = write(
        tmp_path, "c.csv", '\ufeffID,Caption,image\n7,"a red circle, small",a/1.jpg\n8,a blue star,\n'.encode()
    )
    parsed = read_captions(path)
    assert parsed.problems == []
    assert [(r.line, r.caption, r.ref, r.image) for r in parsed.rows] == [
        (2, "a red circle, small", "7", "a/1.jpg"),
        (3, "a blue star", "8", None),
    ]


def test_tsv_and_text(tmp_path):
    tsv = read_captions(write(tmp_path, "c.tsv", b"text\tid\na cat\t1\n"))
    assert [(r.caption, r.ref) for r in tsv.rows] == [("a cat", "1")]
    text = read_captions(write(tmp_path, "c.txt", "a dog\n\n  a café  \n".encode()))
    assert [(r.line, r.caption) for r in text.rows] == [(1, "a dog"), (3, "a café")]


def test_unreadable_rows_are_reported_with_their_line_numbers(tmp_path):
    lines = [
        b'{"caption": "a red circle", "id": 1}',
        b"{not json",
        b'["a list"]',
        b'{"id": 4}',
        b'{"caption": "caf\xe9 latin-1"}',
        b"",
        b'{"text": "a green star", "image": "x.png"}',
    ]
    parsed = read_captions(write(tmp_path, "c.jsonl", b"\n".join(lines)))
    assert [(r.line, r.caption, r.image) for r in parsed.rows] == [
        (1, "a red circle", None),
        (7, "a green star", "x.png"),
    ]
    assert [line for line, _ in parsed.problems] == [2, 3, 4, 5]
    reasons = dict(parsed.problems)
    assert "not JSON" in reasons[2] and reasons[3] == "not a JSON object"
    assert reasons[4] == "no caption" and reasons[5] == "not valid UTF-8"


def test_csv_rows_with_the_wrong_field_count(tmp_path):
    parsed = read_captions(write(tmp_path, "c.csv", b"caption,id\na cat,1\na dog,2,extra\n,3\n"))
    assert [r.caption for r in parsed.rows] == ["a cat"]
    assert parsed.problems == [(3, "3 fields, the header has 2"), (4, "no caption")]


def test_file_level_errors(tmp_path):
    with pytest.raises(BadFileError, match="--format"):
        read_captions(write(tmp_path, "c.xlsx", b"x"))
    with pytest.raises(BadFileError, match="no caption column"):
        read_captions(write(tmp_path, "c.csv", b"name,id\nx,1\n"))
    assert read_captions(write(tmp_path, "c.dat", b"a cat\n"), "text").rows[0].caption == "a cat"
