"""vmtide guest agent: senses load, decides sizes, onlines and offlines CPUs and memory."""
