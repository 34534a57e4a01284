"""What a reviewer reads about a model: split evaluation with plots, Grad-CAM explanations, model cards."""
