"""The ranking analysis: normalisation, ranking, statistics (bootstrap, significance tests,
breakdowns), figures and the report. Reads per-scan metrics tables (``tusrec.scoring``'s
output); never imports the harness."""
