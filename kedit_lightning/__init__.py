"""kedit-lightning: meta-train learned knowledge editors (MEND, SERAC) for multimodal LLMs."""

__version__ = "0.1.0"
