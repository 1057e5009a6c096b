"""`python -m cellar.measure --write-schema --update-readme`: regenerate schemas/objects.json and the README table."""

from .features import main

main()
