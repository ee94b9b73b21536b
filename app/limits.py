"""Pillow's own ceiling on an image's size, which the settings and the decoder both respect.

A module of its own so that the settings (read by `python -m app --help`) need only Pillow."""

from PIL import Image

# Image.open itself refuses images over twice Pillow's MAX_IMAGE_PIXELS (89,478,485 by default),
# whatever our own limit is; Settings caps max_image_pixels at this.
PIL_PIXEL_LIMIT = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
