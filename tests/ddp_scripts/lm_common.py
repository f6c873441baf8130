"Shared pieces of the distributed LM scripts and the tests that check their outputs: a tiny WeightDropout AWD-LSTM LM and a token stream."
import pydoc_data.topics
import torch
from fastai.text.models.core import get_language_model
from weightdrop.awdlstm import AWD_LSTM
from weightdrop.dropout import WeightDropout

VOCAB, BS, SEQ = 64, 4, 12
CONFIG = dict(emb_sz=16, n_hid=32, n_layers=2, pad_token=1, bidir=False, output_p=0.1, hidden_p=0.15,
              input_p=0.25, embed_p=0.05, weight_p=0.5, tie_weights=True, out_bias=True)
MASK_SEED = 1234

def make_model(seed=0):
    "The same tiny LM on every rank and in the single-process check."
    torch.manual_seed(seed)
    return get_language_model(AWD_LSTM, VOCAB, config=dict(CONFIG))

def token_stream(n=40_000):
    "A deterministic token stream: characters of Python's own help text folded into `VOCAB` ids."
    text = ''.join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))[:n]
    return torch.tensor([ord(c) % VOCAB for c in text])

def batch(stream, step, rank, world_size):
    "Rank `rank`'s slice of LM batch `step`: different data on every rank, inputs and next-token targets."
    per = BS * (SEQ + 1)
    start = ((step * world_size + rank) * per) % (len(stream) - per)
    chunk = stream[start:start + per].view(BS, SEQ + 1)
    return chunk[:, :-1], chunk[:, 1:]

def eval_input():
    "A fixed batch for comparing eval outputs."
    return token_stream()[-3 * 20:].view(3, 20)

def weight_droppers(model):
    return [m for m in model.modules() if isinstance(m, WeightDropout)]

def mask_pattern(model):
    "Which effective hidden weights were zeroed in the last training forward: one bool tensor per dropped weight."
    return [getattr(m.wrapped(), n) == 0 for m in weight_droppers(model) for n in m.layer_names]

def eval_outputs(model):
    "Deterministic eval logits of `model` on `eval_input()` from a fresh hidden state."
    model.eval(); model.reset()
    with torch.no_grad(): return model(eval_input())[0]
