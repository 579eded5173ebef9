"""Pattern families beyond masks, one folder each (pattern nodes, program stages, reference):
``combiner`` (summary nodes), ``diffusion`` (multi-hop), ``memory`` (bounded memory slots),
``reuse`` (cross-layer reuse). A family imports the DSL, layout and program layers, never
codegen, the runtime or another family."""
