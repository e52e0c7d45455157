"""Prompts: class words, the token skeleton, splicing, and the learnable banks."""

import pytest
import torch

from pfl.method.prompts import (
    CLASS_WORDS,
    PromptBank,
    build_skeleton,
    class_words,
    splice,
    template_text,
)


def test_class_words_mapping():
    for name in ("pcb1", "pcb2", "pcb3", "pcb4"):
        assert class_words(name) == "printed circuit board"
    assert class_words("macaroni1") == class_words("macaroni2") == "macaroni"
    assert class_words("pipe_fryum") == "pipe fryum"
    assert class_words("chewinggum") == "chewing gum"
    assert class_words("metal_nut") == "metal nut"
    assert class_words("toothbrush") == "toothbrush"
    assert class_words("screw_bag_2") == "screw bag 2"
    assert len(CLASS_WORDS) == 9
    with pytest.raises(ValueError, match="no words"):
        class_words("__")


def test_skeleton_layout(tiny_backbone):
    names = ["metal_nut", "pcb1", "bottle"]
    P, Q = 3, 2
    sk = build_skeleton(tiny_backbone.tokenize, names, P, Q)
    full = tiny_backbone.tokenize([template_text(P, Q, class_words(c)) for c in names])
    x_id = tiny_backbone.tokenize(["X"])[0, 1]
    sos, eot_id = full[0, 0], full.max()
    for i, c in enumerate(names):
        words = tiny_backbone.tokenize([class_words(c)])[0]
        n_words = int(words.argmax()) - 1
        assert sk.ids[i, 0] == sos
        assert bool((sk.ids[i, 1:1 + P + Q] == x_id).all())
        assert torch.equal(sk.ids[i, 1 + P + Q:1 + P + Q + n_words], words[1:1 + n_words])
        assert int(sk.eot[i]) == 1 + P + Q + n_words
        assert sk.ids[i, sk.eot[i]] == eot_id
    # cut right after the longest EOT, identical to the 77-token ids before it
    assert sk.ids.shape[1] == int(sk.eot.max()) + 1
    assert torch.equal(sk.ids, full[:, : sk.ids.shape[1]])
    agnostic = build_skeleton(tiny_backbone.tokenize, names, P, Q, class_aware=False)
    assert agnostic.eot.tolist() == [1 + P + Q] * 3


def test_splice_against_loop():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 1, 9, 4, generator=g)
    ctx = torch.randn(1, 3, 2, 4, generator=g)
    state = torch.randn(2, 3, 3, 4, generator=g)
    out = splice(emb, ctx, state, start=1)
    assert out.shape == (2, 3, 9, 4)
    for i in range(2):
        for j in range(3):
            ref = emb[i, 0].clone()
            ref[1:3] = ctx[0, j]
            ref[3:6] = state[i, j]
            assert torch.equal(out[i, j], ref)
    with pytest.raises(ValueError, match="do not fit"):
        splice(emb[..., :4, :], ctx, state)


def test_bank_init_statistics():
    bank = PromptBank(3, 5, 5, 512, generator=torch.Generator().manual_seed(0))
    for p, mean in ((bank.context, 0.0), (bank.normal, 0.5), (bank.abnormal, -0.5)):
        assert p.shape[0] == 3 and p.shape[-1] == 512
        p = p.detach()
        # 7680 draws: the sample mean's standard error is 0.02 / sqrt(7680) ~ 2.3e-4
        assert abs(float(p.mean()) - mean) < 1.5e-3
        assert abs(float(p.std()) - 0.02) < 1e-3
    again = PromptBank(3, 5, 5, 512, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.normal, bank.normal)


def test_bank_sequences_add_samples_where_the_reference_says():
    g = torch.Generator().manual_seed(1)
    B, P, Q, D, N, R, L = 3, 2, 3, 4, 2, 5, 9
    bank = PromptBank(B, P, Q, D, generator=g)
    emb = torch.randn(N, L, D, generator=g)
    isd = torch.randn(R, N, D, generator=g)
    iad = torch.randn(2, R, N, D, generator=g)
    seq = bank.sequences(emb, isd, iad)
    assert seq.shape == (N, B, R, 2, L, D)
    states = (bank.normal, bank.abnormal)
    for n in range(N):
        for b in range(B):
            for r in range(R):
                for s in range(2):
                    ref = emb[n].clone()
                    ref[1:1 + P] = bank.context[b] + isd[r, n]
                    ref[1 + P:1 + P + Q] = states[s][b] + iad[s, r, n]
                    torch.testing.assert_close(seq[n, b, r, s], ref, rtol=0, atol=0)
    # shared IAD samples (N=1 in dim 2) broadcast to every image; a bank subset
    shared = bank.sequences(emb, isd, iad[:, :, :1], banks=torch.tensor([2]))
    assert shared.shape == (N, 1, R, 2, L, D)
    assert torch.equal(shared[1, 0, :, :, 1 + P:1 + P + Q], seq[0, 2, :, :, 1 + P:1 + P + Q])


def test_spliced_word_embeddings_reproduce_the_plain_text(tiny_backbone):
    # Splicing the embeddings of real words into the placeholders must give exactly the
    # features of the plain sentence: the splice positions and the EOT index are right.
    bb = tiny_backbone
    names = ["metal_nut", "pcb2"]
    sk = build_skeleton(bb.tokenize, names, 2, 1)
    words = bb.token_embedding(bb.tokenize(["a photo damaged"]))[0, 1:4]  # 3 word tokens
    bank = PromptBank(1, 2, 1, bb.text_width)
    with torch.no_grad():
        bank.context.copy_(words[None, :2])
        bank.normal.copy_(words[None, 2:])
        bank.abnormal.copy_(words[None, 2:])
    zeros = torch.zeros(1, len(names), bb.text_width)
    seq = bank.sequences(bb.token_embedding(sk.ids), zeros, zeros.expand(2, 1, -1, -1))
    feats = bb.encode_text_embeddings(seq[:, 0, 0, 0], sk.eot)
    ref = bb.encode_text([f"a photo damaged {class_words(c)}" for c in names])
    torch.testing.assert_close(feats, ref, atol=1e-5, rtol=0)


def test_a_constant_shift_of_the_tokens_is_invisible_to_the_text_tower(tiny_backbone):
    # The reference init puts the normal states at +0.5 and the abnormal at -0.5 in every
    # dimension (docs/reproduction.md, "Prompts"). A shift c * 1 is removed by LayerNorm exactly,
    # LN(x + c 1) = LN(x), and every block of the pre-LN text tower reads its input through LN
    # (ln_final closes it): the +-0.5 alone makes normal and abnormal states no different.
    bb = tiny_backbone
    sk = build_skeleton(bb.tokenize, ["bottle"], 5, 5)
    bank = PromptBank(1, 5, 5, bb.text_width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        bank.abnormal.copy_(bank.normal - 1.0)  # the same noise, the mean moved from +0.5 to -0.5
        zeros = torch.zeros(1, 1, bb.text_width)
        seq = bank.sequences(bb.token_embedding(sk.ids), zeros, zeros.expand(2, 1, -1, -1))
        normal = bb.encode_text_embeddings(seq[:, 0, 0, 0], sk.eot)
        abnormal = bb.encode_text_embeddings(seq[:, 0, 0, 1], sk.eot)
        moved = bb.encode_text_embeddings(seq[:, 0, 0, 0] + 0.3 * torch.randn(
            seq.shape[-1], generator=torch.Generator().manual_seed(1)), sk.eot)
    torch.testing.assert_close(abnormal, normal, atol=1e-5, rtol=0)
    assert (moved - normal).abs().max() > 1e-2  # a non-constant shift does change the feature
