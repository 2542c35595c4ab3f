"""The embedded preset's earlier task, for tests of mechanics rather than of learning: one-fact
ProofWriter-style yes/no questions (8 names x 8 adjectives), a label-only target (a few tokens to
generate) and outer AdamW 1e-3. A few dozen steps learn it, so sweeps, resumes and the engine's
end-to-end checks stay fast whatever the embedded preset's own (harder, multi-hop) task is."""

ONE_FACT = [
    "data.hops=[0]", "data.distractors=0", "data.generator.num_entities=8", "data.generator.num_attributes=8",
    "data.generator.labels=[yes,no]", "outer.multi_task=false", "outer.lr=1e-3", "eval.max_new_tokens=4",
    "model.max_length=32",
]
