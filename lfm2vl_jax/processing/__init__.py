"""Preprocessing: the image processor (torchvision's resize ported exactly), the chat processor."""
