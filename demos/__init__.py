"""mmattn.demos: the Gradio app (``mmattn demo``) and the scripted runs."""
