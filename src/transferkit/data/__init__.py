"""Data sources (named sets, image folders) and batched device-side transforms."""
