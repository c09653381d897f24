"""The model side of a driver: a llama-family decoder with paged attention,
its checkpoint loader, tokenizers and sampler, behind `runner.ModelRunner`.

Nothing is imported here, so the torch-free modules stay torch-free for the
scheduler and gateway: `config`, `tokenizer`, `catalog`, `step`, `errors`.
Everything else imports torch.
"""
