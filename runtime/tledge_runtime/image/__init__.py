"""Images in: opening and decoding under budgets (``decode``) and the one preprocessing path
(``preprocess``) that training, export and every device call."""
