"""From an image to probabilities, masks and objects: the tile plan, the sliding window, the writer."""
