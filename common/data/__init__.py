"""Datasets and their delivery: synthetic and built-in sets, image folders (index,
transforms, decoding), batches as bytes, ELPV."""
