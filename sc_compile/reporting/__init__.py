"""What users read: the report of a generation (``report``) and what the passes find in a
model before it runs (``explanation``)."""
