"""Data set readers, joint transforms, crops, downloads and synthetic scenes."""
