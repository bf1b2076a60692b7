"""pneumoray: a Ray platform for pediatric pneumonia chest X-ray classification.

The library behind the thin entry points in jobs/, tune/ and serve/: data, phantoms, models,
training loops, generation, metrics and the model registry.
"""
