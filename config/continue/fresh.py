# As restored.py, with a fresh optimizer (Adam's moments and step count start from zero).
include("restored.py")
reset_optimizer = True
out_dir = "out-continue/fresh"
