"""What an image is and how it is prepared: axes and channels, normalisation, pixel size and zoom."""
