"""The Matryoshka building blocks: nesting lists, the multi-size linear head and the loss."""
