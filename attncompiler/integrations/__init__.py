"""Integrations with model libraries.

:mod:`attncompiler.integrations.transformers` plugs compiled attention into Hugging Face
transformers (``attn_implementation="attncompiler"``). Nothing here imports the model library
until it is used, so ``import attncompiler`` stays fast and the library stays optional
(``pip install attncompiler[hf]``).
"""
