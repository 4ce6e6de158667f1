import pytest
import torch

from compress.kernels.packing import pack_int32, packed_words, unpack_int32


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 100, 576])
def test_round_trip_is_exact(bits, n):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = torch.randint(lo, hi, (5, n), generator=torch.Generator().manual_seed(bits * 1000 + n))
    words = pack_int32(q, bits)
    assert words.dtype == torch.int32 and words.shape == (5, packed_words(n, bits))
    assert torch.equal(unpack_int32(words, bits, n).long(), q)
    words0 = pack_int32(q, bits, dim=0)
    assert words0.shape == (packed_words(5, bits), n)
    assert torch.equal(unpack_int32(words0, bits, 5, dim=0).long(), q)


def test_known_int4_word():
    # From a real compressed-tensors checkpoint: 0x4cc58978 holds 0, -1, 1, 0, -3, 4, 4, -4.
    word = torch.tensor([[0x4CC58978]], dtype=torch.int64).to(torch.int32)
    assert unpack_int32(word, 4, 8).tolist() == [[0, -1, 1, 0, -3, 4, 4, -4]]
    assert pack_int32(torch.tensor([[0, -1, 1, 0, -3, 4, 4, -4]]), 4).item() == word.item()


def test_three_bit_codes_cross_word_boundaries():
    # 32 three-bit codes fill exactly 3 words; code 10 straddles words 0 and 1.
    q = torch.zeros(1, 32, dtype=torch.long) - 4          # stored as 0
    q[0, 10] = 3                                          # stored as 7 = 0b111 at bits 30..32
    words = pack_int32(q, 3)
    assert words.shape == (1, 3)
    assert (words[0, 0].item() & 0xFFFFFFFF) == 0b11 << 30 and words[0, 1].item() == 0b1


@pytest.mark.parametrize("bits", range(2, 9))
def test_matches_compressed_tensors(bits):
    ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (9, 576), dtype=torch.int8)
    assert torch.equal(pack_int32(q, bits), ct.pack_to_int32(q, bits))
    assert torch.equal(pack_int32(q, bits, dim=0), ct.pack_to_int32(q, bits, packed_dim=0))


def test_out_of_range_codes_are_refused():
    with pytest.raises(ValueError, match="4-bit range"):
        pack_int32(torch.tensor([[8]]), 4)


def test_wrong_word_count_is_refused():
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_int32(torch.zeros(2, 3, dtype=torch.int32), 4, 32)
