"""Generation: the engine, sampling, streaming text, the tool registry and the tool loop."""
