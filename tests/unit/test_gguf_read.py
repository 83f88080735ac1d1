"""The exporter's fast GGUF header reader reads what gguf's own GGUFReader reads (scalars, strings, array
lengths and short arrays' values, tensors' names and shapes), and refuses a file that is not whole."""

import numpy as np
import pytest

from training.export.gguf_read import GGUFHeaderError, read_header


@pytest.fixture
def gguf_file(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_uint32("llama.block_count", 3)
    w.add_float32("llama.rope.freq_base", 10000.0)
    w.add_bool("tokenizer.ggml.add_bos_token", True)
    w.add_int64("some.int64", -5)
    w.add_token_list([f"tok{i}-é" for i in range(300)])  # a long string array: stepped over
    w.add_token_scores([float(i) for i in range(300)])     # a long float array
    w.add_array("some.short", [1, 2, 3])
    w.add_tensor("a.weight", np.ones((4, 8), dtype=np.float32))
    w.add_tensor("b.bias", np.zeros((5,), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_the_header_matches_ggufs_own_reader(gguf_file):
    import gguf

    theirs = gguf.GGUFReader(str(gguf_file))
    mine = read_header(gguf_file)
    fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}  # the reader's own header keys
    assert set(mine.fields) == set(fields)
    for key, f in fields.items():
        got = mine.fields[key]
        if hasattr(got, "length"):
            assert got.length == len(f.data), key
            if got.values is not None:
                assert list(got.values) == list(f.contents()), key
        else:
            assert got == pytest.approx(f.contents()) if isinstance(got, float) else got == f.contents(), key
    assert mine.fields["some.short"].values == [1, 2, 3]
    assert len(mine.fields["tokenizer.ggml.tokens"]) == 300
    assert [(n, s) for n, s, _ in mine.tensors] == [(t.name, [int(x) for x in t.shape]) for t in theirs.tensors]


def test_a_cut_or_foreign_file_is_refused_with_its_name(gguf_file, tmp_path):
    data = gguf_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in (0, 10, 200, 1500, data.index(b"a.weight") + 3):  # empty, the counts, strings, the tokens, a tensor
        cut.write_bytes(data[:n])
        with pytest.raises(GGUFHeaderError, match="cut.gguf"):
            read_header(cut)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(GGUFHeaderError, match="not a GGUF file"):
        read_header(other)
