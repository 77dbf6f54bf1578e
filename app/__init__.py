"""The faces of headscope: the `headscope` CLI (`app.cli`), HTML reports (`app.report`)."""
