"""Sphinx's Chinese search language, without its quadratic slowdown.

``sphinx.search.zh.SearchChinese`` (Sphinx 7.4) keeps every Latin word it has split in a
class-level *list*, and its ``stem`` asks ``word in self.latin_terms`` for every word: a
linear scan of a list that grows with the whole book, so indexing the Chinese edition took
longer than building it (16 s of the build here). This is the same language with that
record kept as a set; what it indexes is unchanged. Only the Chinese edition loads it
(i18n/editions.py adds it to that build's extensions).
"""
from sphinx.search import zh


class SearchChinese(zh.SearchChinese):
    def init(self, options):
        super().init(options)
        self.latin_terms = set()

    def split(self, input):
        chinese = list(zh.jieba.cut_for_search(input)) if zh.JIEBA else []
        latin = [term.strip() for term in self.latin1_letters.findall(input)]
        self.latin_terms.update(latin)
        return chinese + latin


def setup(app):
    if not zh.JIEBA:            # without jieba Sphinx would index no Chinese word at all
        raise RuntimeError("the Chinese edition's search needs jieba (requirements.txt pins it)")
    app.add_search_language(SearchChinese)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
