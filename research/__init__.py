"""The research record's scripts: validation of members and ensembles on held-out subjects,
the oracles from the true motion, the cues in the frames (docs/research.md). Their results
and the rules committed before each judgement lie beside them."""
