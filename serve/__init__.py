"""The Ray Serve application that generates faces from text, masks and sketches."""
