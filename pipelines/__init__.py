"""mmattn.pipelines: ready-made generation and VQA pipelines."""
