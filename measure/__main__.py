"""`python -m measure --write-schema --update-readme`: regenerate schemas/objects.json and the README table."""

from measure.features import main

main()
